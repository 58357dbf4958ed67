"""The shared code of the BraTS federated-learning example, one module per concern.

- settings: every training setting with the paper's defaults and the demo's overrides; paths and exit codes
- pipeline: the imaging pipeline (transforms, loss, sliding-window inference, training-time Dice)
- metrics: the BraTS challenge's evaluation metrics
- job_results: what a finished job left behind, read back and checked
- privacy: differential privacy (SVT accounting, DP-SGD, the privacy report); ``python -m brats_fl.privacy``

Entry points (job.py, client.py) and tools (result_stat/, dataset_brats18/, benchmarks/) use this package; it uses
MONAI, PyTorch and NVFlare, never them.
"""
