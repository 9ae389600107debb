"""The data layer: `load(dataset_id, device)` turns any dataset id into an `OfflineData`.

    dataset.py          load and its sources: D4RL files, local builds, Minari datasets
    d4rl.py             D4RL's own HDF5 files, read with h5py alone
    minari_datasets.py  Minari datasets, local or downloaded, read into flat arrays
    flat.py             the flat arrays' cache and checks
    tasks.py            what a dataset id says (its task) and how observations are flattened
    evaluation.py       a policy's returns and normalised score in the dataset's evaluation env
    recipe.py           D4RL's recipe: local/<env>/<kind>-v0 datasets from SAC snapshots
    snapshots.py        the snapshots' manifest (medium, expert) and the shipped snapshots
    rollouts.py         the snapshots' actor, behaviour policies, rollouts
    errors.py           UserError and atomic writes

Nothing here imports common.py, run_folder.py or tools/: the algorithm files reach it through
common.load_dataset and common.evaluate, and tools/make_dataset.py is the command line of recipe.py plus the SAC training.
"""

from offline_data.dataset import OfflineData, load, open_source  # noqa: F401
