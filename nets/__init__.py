"""The network and what its outputs mean: HRNet trunk (hrnet.py), SPM heads (spm_model.py), the
SPR codec that turns people into target maps and maps back into people (spr.py), the losses
(losses.py) and the official-weight converter (weights.py). Imports only ``config``."""
