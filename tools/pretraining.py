"""Which algorithm files train something besides their RL updates, and the flags that size it.

The one list that tools/benchmark.py (its --bc-steps), tools/diagnostics/bench_cpu.py (which skips all of it,
since it times the RL updates) and the tests (which shrink it to run in seconds) read. The algorithm
files do not import it; tests/test_algorithms.py checks it against their Args.
"""

from __future__ import annotations

# Phases before the RL loop, not counted in --total-steps. A file's behaviour model is always --bc-steps.
PRETRAINING = {
    "fisher_brc": ("--bc-steps",),  # behaviour model
    "itrpo": ("--bc-steps",),  # behaviour model
    "brac_plus": ("--bc-steps", "--pretrain-steps"),  # VAE ensemble; then pi_0 and Q_0
    "arq": ("--bc-steps",),  # score model (then the support set, sized by CHEAP below)
}
# Behaviour cloning of the actor inside the RL loop, counted in --total-steps: not a pretraining
# phase, but a short run that keeps the default does nothing else.
BC_WARMUP = {"cql": "--bc-warmup-steps"}
# What else makes a pretraining phase quick without fewer steps: ARQ's support set (30 samples per
# state, 500-step sampler, 20-step likelihood ODE by default). Only for timing and smoke runs: these
# change what a run learns, so the benchmark never passes them.
CHEAP = {"arq": ("--n-support", "2", "--sampler", "ode", "--sampler-steps", "2", "--likelihood-steps", "2")}


def behaviour_flag(algo: str) -> str | None:
    """The flag of `algo`'s behaviour-cloning phase, before or inside the RL loop (None if it has none)."""
    return "--bc-steps" if "--bc-steps" in PRETRAINING.get(algo, ()) else BC_WARMUP.get(algo)


def shrink_flags(algo: str, steps: int) -> list[str]:
    """Flags that give every phase of `algo` other than its RL updates `steps` steps and make it cheap,
    so that the RL updates are most of a run (timing, smoke tests)."""
    flags = list(PRETRAINING.get(algo, ()))
    if algo in BC_WARMUP:
        flags.append(BC_WARMUP[algo])
    return [x for flag in flags for x in (flag, str(steps))] + list(CHEAP.get(algo, ()))
