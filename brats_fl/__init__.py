"""The shared code of the BraTS federated-learning example, one module per concern.

- cli: every job.py flag once; run_options: the flags turned into one checked, frozen RunOptions
- settings: every training setting with the paper's defaults and the demo's overrides; paths and exit codes
- environments: what differs between the simulator, a POC and a provisioned deployment; runner: running them
- nvflare_compat: every workaround of NVFlare 2.9's internals, in one place
- recipes, fl_components: what the NVFlare jobs are made of; resume: continuing a stopped job; reporting: job.py's
  printed summary
- pipeline: the imaging pipeline (transforms, loss, sliding-window inference, training-time Dice)
- metrics: the BraTS challenge's evaluation metrics
- job_results: what a finished job left behind, read back and checked
- site_models: server workflows with one model per site (local-only training, several models scored at the sites);
  cross_site: the cross-site matrix (who gains from federating) and the local-only job's report
- privacy: differential privacy (SVT accounting, DP-SGD, the privacy report); ``python -m brats_fl.privacy``

Entry points (job.py, client.py) and tools (result_stat/, dataset_brats18/, benchmarks/) use this package; it uses
MONAI, PyTorch and NVFlare, never them.
"""
