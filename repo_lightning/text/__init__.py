"""Text handling shared by the data module and the models: tokenizers and prompt templates."""
