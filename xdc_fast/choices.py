"""The small closed sets every layer names: modalities, devices and loaders, each with its help.

Declared once, below everything (no torch, no extension), so that the CLI's choices, the configuration
checks and the code that acts on a value all read the same tuple and ``--help`` stays cheap.
"""

MODALITIES = ("video", "audio")

# "auto" picks CUDA when there is one; the benchmarks take a concrete device.
DEVICES = ("auto", "cpu", "cuda")
CONCRETE_DEVICES = tuple(d for d in DEVICES if d != "auto")
DEVICE_HELP = "auto: CUDA when there is one."

LOADERS = {
    "auto": "DALI when the device is CUDA and DALI imports and builds its pipeline, else PyAV, said in one log "
            "line with the reason",
    "pyav": "on the CPU, in DataLoader worker processes",
    "dali": "NVDEC on CUDA; on the CPU its graph reads VP8/VP9/MJPEG only",
}
CONCRETE_LOADERS = tuple(name for name in LOADERS if name != "auto")
LOADER_HELP = "Decoding. " + "; ".join(f"{name}: {summary}" for name, summary in LOADERS.items()) + "."

# The CPU k-means assignment engines, best first (the extension's run-time dispatch offers those the CPU has).
CPU_ISAS = ("avx512", "avx2", "portable")

# --resume of pretrain and finetune: "auto" says yes under torchrun's elastic agent, SLURM or submit
# (the rules are xdc_fast.launch's).
RESUMES = ("auto", "yes", "no")
