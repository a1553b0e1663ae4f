"""plait.offload: saved-activation offload to host memory or SSD (SSDTrain-style)."""
