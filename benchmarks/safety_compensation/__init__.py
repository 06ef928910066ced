"""Safety compensation on SafetyWorld: PPO, Safe RLHF's PPO-Lagrangian and RePO side by side (issues 4, 9, 13).

For every seed the benchmark trains the SFT, reward and cost models with the shipped stage configs
(``Pipeline.train_rounds``), then ``ppo``, ``ppo_lag`` and ``repo`` from the same SFT start with the same rollout
budget, and evaluates the SFT start and each policy with the ground-truth oracles on SafetyWorld's held-out prompts
(``k`` samples per prompt). Every stage is an ordinary ``python -m repo_lightning`` run of
``<config-dir>/<stage>.yaml``; the benchmark only adds orchestration: seeds, the multiplier search, ablations, the
advantage estimators, aggregation over seeds, tables and plots.

Multiplier search (fair settings). On the search seed only (default: the first), each constrained algorithm trains
the candidates of its own small grid (``search.SEARCH_GRID``: rule ``lr`` x ``initial`` x Safe RLHF's
``threshold`` or RePO's ``target_unsafe_rate``; the first ``--search-candidates`` of each), each once. Every
candidate is scored on the *validation* prompts (the slice of the RL prompt pool that ``data.val_fraction`` holds
out, one sample per prompt, computed at the end of training over the whole split) and the same rule picks the
winner for both algorithms: lowest ``val/true_unsafe_prompt_rate``; candidates within ``--tie`` of the lowest are
ranked by higher ``val/true_reward_mean``. The held-out evaluation prompts (other template/verb combinations) are
never used for the choice. The winner's search-seed run is reused as that seed's reported run; other seeds retrain.

Ablations (RePO with the searched settings, one knob changed; not searched themselves): ``rectify: prompt``, the
``AdditiveRule`` (same ``lr``), the ``PIDRule`` (``ki`` = the searched ``lr``, ``kp`` = 1) and the paper's
``constraint: rectified_cost`` (capped at the configs' ``maximum``). They run on the search seed only unless
``--ablation-seeds`` says otherwise.

Advantage estimators (``--estimators gae rloo grpo reinforce_pp``; default ``gae``, the configs' own): ``ppo_lag``
and ``repo`` are trained again with each other estimator, with their searched settings and the same budget, and
compared on unsafe prompt rates, helpfulness, KL, and the wall time and peak RSS of the policy ``fit`` process.

World: ``--world KEY=VALUE ...`` sets ``WorldConfig`` fields for every stage (a second world); the world used is
recorded in ``results.json`` and ``results.md``.

Outputs in ``--out``: ``results.json`` (every run's metrics, per-seed values, the search log, settings, the world,
wall times and peak memory), ``results.md`` (mean +- std over seeds) and PNG plots.

Examples::

    python -m benchmarks.safety_compensation                       # 3 seeds, default budget
    python -m benchmarks.safety_compensation --estimators gae rloo grpo
    python -m benchmarks.safety_compensation --seeds 0 --no-ablations --policy-epochs 1
    python -m benchmarks.safety_compensation --world mild_severity=0.5 seed=1   # a second world
    python -m benchmarks.safety_compensation --small --out /tmp/sc-small   # CI-sized smoke run
"""
