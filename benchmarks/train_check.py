"""The training step on a GPU in one prepared run: what XDC trains, against the card's ceiling and the
reference recipe of the field, with where the time goes.

    PYTHONPATH=. python3 benchmarks/train_check.py --json OUT.jsonl [--deadline-s 420] [--batch-size 32]

No build and no loader (synthetic clips already on the device), one process, one JSON line written and
flushed per row, so a run cut by its deadline or a timeout keeps every row it finished. Rows, the most
informative first:

1. ``ceiling``: the bf16 ``torch.mm`` 8192³ rate of this run (MFU is held against it).
2. ``joint``: the step ``pretrain`` runs for XDC: video (R(2+1)D-18) and audio encoders with a 256-way
   head each, one SGD step on the summed cross-entropy, bf16 autocast, video clips in
   ``channels_last_3d``; eager with cuDNN's autotuner off and on, eager with the (2+1)D convolutions
   as 2-D ones on views (``xdc_fast.models.r2plus1d.use_2d_views``), eager without a host sync in the
   step (``supervised_step(sync=False)``), then compiled (``torch.compile``).
3. ``reference``: torchvision's video-classification recipe for R(2+1)D-18 (``references/video_classification``:
   fp16 autocast with a GradScaler, contiguous clips, cuDNN's autotuner on, eager), on the same clip
   shape and batch, so the table reads ours against it as a ratio as well as MFU.
4. ``video`` and ``audio``: each encoder's step alone (eager, autotuner on); on a GPU the audio one also
   compiled into CUDA graphs (``mode="reduce-overhead"``), as its small kernels may be launch-bound.
5. ``profile``: CUDA kernel time of the eager joint step by category (convolution, normalisation,
   elementwise, layout copies, optimizer, other) and the top kernels.
6. ``conv``: every distinct convolution shape of R(2+1)D-18, forward and backward in bf16, as Conv3d on
   ``channels_last_3d`` against the same (2+1)D convolution as Conv2d on a view: the spatial (1, k, k)
   one over frames folded into the batch, the temporal (k, 1, 1) one with height and width folded; and
   against the Conv3d with its channel counts padded with zeros to multiples of 8.

``--device cpu --arch tiny`` runs the same rows on the CPU (fp32, no autocast), for checking the script.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch import nn

from xdc_fast import engine
from xdc_fast.bench.timing import gemm_rate, interleaved_best_times, machine
from xdc_fast.bench.train import _model, _synthetic, count_flops
from xdc_fast.models.r2plus1d import conv_on_views, has_2d_form, use_2d_views


class Run:
    """The rows of one run: each printed and appended to the JSON-lines file as soon as it is measured."""

    def __init__(self, path: str, deadline_s: float):
        self.path, self.deadline = path, time.perf_counter() + deadline_s
        open(path, "w").close()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def row(self, **fields) -> dict:
        line = json.dumps(fields)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return fields

    def guarded(self, name: str, need_s: float, fn) -> None:
        """``fn()`` unless fewer than ``need_s`` seconds are left; a failure is a row, not the end."""
        if self.left() < need_s:
            self.row(section=name, skipped=f"{self.left():.0f} s left, {need_s:.0f} s needed")
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
            self.row(section=name, error=f"{type(error).__name__}: {error}"[:400])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def encoders(arch: str, modalities, dev):
    return _model(arch, "+".join(modalities), dev)


def inputs_of(modalities, batch_size, dev, clip):
    return _synthetic("+".join(modalities), batch_size, dev, clip)


def step_rows(run: Run, name: str, arch: str, modalities, batch_size: int, steps: int, dev, clip, ceiling,
              forms=("eager", "eager_autotuned", "compiled")) -> dict:
    """The engine's step over ``modalities`` in each form; returns seconds per step by form."""
    model, optimizer = encoders(arch, modalities, dev)
    inputs, targets = inputs_of(modalities, batch_size, dev, clip)
    flops = count_flops(lambda: engine.supervised_step(model, [optimizer], inputs, targets)) / batch_size
    seconds = {}
    for form in forms:
        if run.left() < 30:
            run.row(section=name, form=form, skipped="deadline")
            continue
        torch.backends.cudnn.benchmark = form != "eager"
        timed = model
        use_2d_views(model, on=form == "eager_autotuned_2d_views")
        if form.startswith("compiled"):  # compiled_cudagraphs: replayed as CUDA graphs, for launch-bound steps
            mode = "reduce-overhead" if form == "compiled_cudagraphs" else None
            timed = engine.EncodersWithHeads({m: torch.compile(model.encoders[m], mode=mode) for m in modalities},
                                             model.heads)
        t0 = time.perf_counter()
        sync = form != "eager_autotuned_no_sync"
        step = lambda: engine.supervised_step(timed, [optimizer], inputs, targets, sync=sync)  # noqa: E731
        for _ in range(2):  # compilation and the autotuner's trials happen here, outside the timing
            step()
        s = interleaved_best_times({"step": step}, steps, dev)["step"]
        seconds[form] = s
        run.row(section=name, form=form, arch=arch, modalities=list(modalities), batch_size=batch_size,
                seconds_per_step=s, clips_per_s=batch_size / s, flops_per_clip=flops,
                mfu=flops * batch_size / s / ceiling if ceiling else None, setup_s=time.perf_counter() - t0)
    torch.backends.cudnn.benchmark = False
    use_2d_views(model, on=False)
    return seconds


def reference_row(run: Run, batch_size: int, steps: int, dev, clip, ceiling, ours: dict) -> None:
    """torchvision's reference recipe: its R(2+1)D-18, fp16 autocast + GradScaler, contiguous clips."""
    from torchvision.models.video import r2plus1d_18

    torch.backends.cudnn.benchmark = True
    model = r2plus1d_18(num_classes=400).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    cuda = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    clips = torch.randn(batch_size, 3, clip.frames, clip.crop, clip.crop, device=dev)
    labels = torch.randint(0, 400, (batch_size,), device=dev)
    criterion = nn.CrossEntropyLoss()

    def step():
        with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
            loss = criterion(model(clips), labels)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    flops = count_flops(step) / batch_size
    s = interleaved_best_times({"step": step}, steps, dev)["step"]
    ours_video = ours.get("eager_autotuned")  # our R(2+1)D-18 step alone, only when the arch is that one
    run.row(section="reference", recipe="torchvision video_classification: fp16 autocast + GradScaler, contiguous",
            batch_size=batch_size, seconds_per_step=s, clips_per_s=batch_size / s, flops_per_clip=flops,
            mfu=flops * batch_size / s / ceiling if ceiling else None,
            ours_clips_per_s_over_reference=(s / ours_video) if ours_video else None)
    torch.backends.cudnn.benchmark = False


CATEGORIES = (("convolution", ("conv", "xmma", "implicit", "wgrad", "dgrad", "fprop", "sm90", "cutlass", "gemm")),
              ("normalisation", ("batch_norm", "batchnorm", "bn_", "welford")),
              ("layout copy", ("copy", "transpose", "nchw", "nhwc", "permute")),
              ("optimizer", ("multi_tensor", "foreach", "sgd")),
              ("elementwise", ("elementwise", "vectorized", "relu", "threshold", "add", "mul", "triton")))


def profile_rows(run: Run, arch: str, batch_size: int, dev, clip) -> None:
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = encoders(arch, ("video", "audio"), dev)
    inputs, targets = inputs_of(("video", "audio"), batch_size, dev, clip)
    torch.backends.cudnn.benchmark = True
    for _ in range(3):
        engine.supervised_step(model, [optimizer], inputs, targets)
    activities = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(3):
            engine.supervised_step(model, [optimizer], inputs, targets)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    by_category, by_kernel = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if dev.type == "cuda" else event.self_cpu_time_total
        if us <= 0:
            continue
        name = event.key.lower()
        group = next((c for c, words in CATEGORIES if any(w in name for w in words)), "other")
        by_category[group] += us / 3
        by_kernel[event.key[:120]] += us / 3
    total = sum(by_category.values()) or 1.0
    run.row(section="profile", per_step_ms=total / 1e3,
            share={c: v / total for c, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            top=[{"kernel": k, "ms_per_step": v / 1e3} for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]])
    torch.backends.cudnn.benchmark = False


def conv_shapes(arch: str, batch_size: int, dev, clip) -> list[tuple]:
    """(in shape, conv) of every distinct Conv3d of the video encoder, from one forward pass."""
    from xdc_fast.models import build_video_encoder

    net = build_video_encoder(arch).to(dev)
    seen, hooks = {}, []

    def record(module, args, _output) -> None:  # returns None: a hook's return value replaces the output
        key = (tuple(args[0].shape), module.in_channels, module.out_channels, module.kernel_size, module.stride,
               module.padding)
        seen.setdefault(key, module)

    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        net(torch.randn(batch_size, 3, clip.frames, clip.crop, clip.crop, device=dev))
    for h in hooks:
        h.remove()
    return list(seen.items())


def padded_to_8(conv: nn.Conv3d) -> nn.Conv3d | None:
    """``conv`` with its input and output channels rounded up to multiples of 8 by zero weights (the
    first ``out_channels`` outputs are unchanged on an input padded with zero channels); None when both
    already are."""
    grown = lambda n: -(-n // 8) * 8  # noqa: E731
    if conv.in_channels % 8 == 0 and conv.out_channels % 8 == 0:
        return None
    padded = nn.Conv3d(grown(conv.in_channels), grown(conv.out_channels), conv.kernel_size, conv.stride, conv.padding,
                       bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:conv.out_channels, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            padded.bias.zero_()
            padded.bias[:conv.out_channels] = conv.bias
    return padded.to(memory_format=torch.channels_last_3d)


def conv_rows(run: Run, arch: str, batch_size: int, steps: int, dev, clip) -> None:
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = True
    for (shape, *_), conv in conv_shapes(arch, batch_size, dev, clip):
        if run.left() < 10:
            run.row(section="conv", skipped="deadline")
            return
        conv = conv.to(dtype)
        tolerance = 0.05 if cuda else 1e-4  # bf16 on the GPU
        x3 = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        x3.requires_grad_(True)
        layout = conv.to(memory_format=torch.channels_last_3d)

        def conv3d():
            layout(x3).sum().backward()

        def conv2d():
            conv_on_views(conv, x3).sum().backward()

        # The same convolution with both channel counts rounded up to a multiple of 8 (zero weights and
        # zero input channels), as cuDNN's tensor-core kernels prefer; only worth a model change if faster.
        padded = padded_to_8(conv)
        x3_padded = None if padded is None else nn.functional.pad(
            x3.detach(), (0, 0, 0, 0, 0, 0, 0, padded.in_channels - conv.in_channels)
        ).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)

        def conv3d_padded():
            padded(x3_padded).sum().backward()

        jobs, same = {"conv3d": conv3d}, None
        if padded is not None:
            jobs["conv3d_padded"] = conv3d_padded
        if has_2d_form(conv):  # the downsampling shortcut (1x1x1, strided in space) has none
            jobs["conv2d_view"] = conv2d
            same = bool(torch.allclose(conv_on_views(conv, x3).float(), layout(x3).float(), atol=tolerance, rtol=tolerance))
        times = interleaved_best_times(jobs, steps, dev)
        # Forward, input gradient and weight gradient: 3 x 2 FLOPs per multiply-add of the forward pass.
        multiply_adds = layout(x3).numel() * conv.in_channels * conv.weight[0, 0].numel()
        total = 3 * 2 * multiply_adds
        padded_same = None if padded is None else bool(torch.allclose(
            padded(x3_padded)[:, :conv.out_channels].float(), layout(x3).float(), atol=tolerance, rtol=tolerance))
        run.row(section="conv", input=list(shape), kernel=list(conv.kernel_size), stride=list(conv.stride),
                channels=[conv.in_channels, conv.out_channels], same_output=same,
                conv3d_padded_ms=1e3 * times["conv3d_padded"] if padded is not None else None,
                padded_same_output=padded_same,
                conv3d_ms=1e3 * times["conv3d"], conv2d_view_ms=1e3 * times["conv2d_view"] if same is not None else None,
                conv3d_tflops=total / times["conv3d"] / 1e12,
                conv2d_view_tflops=total / times["conv2d_view"] / 1e12 if same is not None else None)
    torch.backends.cudnn.benchmark = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="JSON lines, one per row")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="r2plus1d_18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=420.0)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled step (minutes on a CPU)")
    args = parser.parse_args()
    dev = torch.device(args.device)
    run = Run(args.json, args.deadline_s)
    from xdc_fast.config import PretrainConfig

    clip = PretrainConfig(arch=args.arch).clip_config()  # the arch's clip geometry, as pretrain trains it
    rate = gemm_rate(dev)
    ceiling = rate["flops_per_s"] if rate["dtype"] == "bfloat16" else None
    run.row(section="ceiling", device=machine(dev), **rate, torch=torch.__version__)
    ours: dict = {}
    # The (2+1)D convolutions as 2-D ones on views (same weights), next to the default eager step.
    # Then without reading the step's figures back (no host sync: the host queues the next step early).
    forms = ("eager", "eager_autotuned", "eager_autotuned_2d_views", "eager_autotuned_no_sync") + \
        (() if args.no_compile else ("compiled",))
    run.guarded("joint", 60, lambda: step_rows(run, "joint", args.arch, ("video", "audio"), args.batch_size,
                                               args.steps, dev, clip, ceiling, forms))
    video = lambda: step_rows(run, "video", args.arch, ("video",), args.batch_size, args.steps, dev, clip,  # noqa: E731
                              ceiling, forms=("eager_autotuned",))
    run.guarded("video", 30, lambda: ours.update(video()) if args.arch == "r2plus1d_18" else video())
    # The reference recipe trains torchvision's R(2+1)D-18 whatever --arch says (on the CPU, to check the row).
    if args.arch == "r2plus1d_18" or dev.type == "cpu":
        run.guarded("reference", 30, lambda: reference_row(run, args.batch_size, args.steps, dev, clip, ceiling, ours))
    # The audio encoder's kernels are small: launches may bound its step, which CUDA graphs remove.
    audio_forms = ("eager_autotuned",) + (("compiled_cudagraphs",) if dev.type == "cuda" and not args.no_compile else ())
    run.guarded("audio", 20, lambda: step_rows(run, "audio", args.arch, ("audio",), args.batch_size, args.steps,
                                               dev, clip, ceiling, forms=audio_forms))
    run.guarded("profile", 30, lambda: profile_rows(run, args.arch, args.batch_size, dev, clip))
    run.guarded("conv", 20, lambda: conv_rows(run, args.arch, args.batch_size, args.steps, dev, clip))
    run.row(section="done", seconds_left=run.left())


if __name__ == "__main__":
    main()
