"""The nearest-code benchmark's other columns: outside searches, CUDA-graph replays and the
VQ-EMA training step, each as a zero-argument callable that :func:`nearest.measure` times.

- flash-kmeans (PyPI ``flash-kmeans``): its fused Triton assign ``euclid_assign_triton``
  on fp16 inputs with both norms precomputed outside the timed call (its best case);
- FAISS GPU brute force (``GpuIndexFlatL2``, k = 1) on fp32 inputs, when ``faiss`` with
  GPU support imports;
- ``graph``: a callable replayed from a CUDA graph, so no host work is timed (what an
  eager call would cost with zero Python around the kernels);
- :func:`train_steps`: forward + backward + EMA update of one ``VectorQuantizer`` step, ours
  eager, under ``torch.compile(fullgraph=True)`` and replayed from a CUDA graph, against
  vector-quantize-pytorch's. The backward starts from a fixed gradient of the output (as a
  decoder would hand it down) and a unit gradient of each loss, as a layer's own benchmark does:
  no loss of the benchmark's own adds its kernels to the layer's.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import torch


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def flash_kmeans(x: torch.Tensor, c: torch.Tensor) -> tuple[Callable | None, tuple, str]:
    """``(fn, (x, c) as it sees them, status)``; ``fn()`` returns int32 indices ``(1, N)``."""
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton  # noqa: PLC0415
    except ImportError as e:
        return None, (), f"not installed ({e.name})"
    xh, ch = x.half()[None], c.half()[None]
    x_sq, c_sq = xh.float().square().sum(-1), ch.float().square().sum(-1)
    out = torch.empty(x_sq.shape, device=x.device, dtype=torch.int32)
    return (lambda: euclid_assign_triton(xh, ch, x_sq, out=out, c_sq=c_sq)), (xh[0], ch[0]), "ok"


def faiss_flat(x: torch.Tensor, c: torch.Tensor) -> tuple[Callable | None, str]:
    """``(fn, status)``; ``fn()`` returns ``(distances, indices)`` ``(N, 1)`` on the GPU."""
    try:
        import faiss  # noqa: PLC0415
        import faiss.contrib.torch_utils  # noqa: F401, PLC0415  (torch tensors in and out)
    except ImportError as e:
        return None, f"not installed ({e.name})"
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None, "faiss has no GPU support here"
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatL2(res, c.shape[1])
    index.add(c.float().contiguous())
    xf = x.float().contiguous()
    return (lambda: index.search(xf, 1)), "ok"


def graph(fn: Callable) -> Callable:
    """``fn`` captured once in a CUDA graph (after warm-up calls that compile and autotune,
    on the capture's side stream: PyTorch's recipe for capturing backward passes, whose
    gradient accumulators belong to the stream they were first used on); the returned
    callable replays it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def lazy(build: Callable[[], Callable]) -> Callable:
    """The callable ``build()`` returns, built at the first call (a build that fails then fails
    that call, where the benchmark records it)."""
    made = None

    def run():
        nonlocal made
        if made is None:
            made = build()
        return made()

    return run


def lazy_graph(fn: Callable) -> Callable:
    """:func:`graph` of ``fn``, captured at the first call."""
    return lazy(lambda: graph(fn))


def train_steps(n: int, k: int, d: int, vqp_cls) -> dict[str, Callable]:
    """Named step callables for one ``n x k x d`` case: ``ours`` (eager), ``ours_compiled``
    (the quantizer under ``torch.compile(fullgraph=True)``: it fails on any graph break or
    host sync), ``ours_compiled_graphs`` (the same with ``mode="reduce-overhead"``: the
    compiled step replayed from CUDA graphs, what a user's compiled training loop gets),
    ``ours_graphed`` (the quantizer through ``torch.cuda.make_graphed_callables``: its forward and
    backward replayed from CUDA graphs, a user's way to the next column), ``ours_graph`` (the eager
    step replayed from a CUDA graph: its kernels without the host), ``ours_unfused``, ``ours_unfused_compiled`` and ``ours_unfused_graph`` (eager, compiled and
    graph with the torch version of the
    straight-through output and the EMA update instead of the fused kernels), ``search`` (the nearest-code search of the step alone),
    ``search_graph`` (that search replayed from a CUDA graph), ``vqp`` and ``vqp_compiled`` (theirs
    under ``torch.compile``, graph breaks allowed)."""
    from tokenizers_vq import VectorQuantizer  # noqa: PLC0415
    from tokenizers_vq.quantizers import _fused  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    z = torch.randn(n // 1024, 1024, d, device="cuda", requires_grad=True)
    g, one = torch.randn_like(z) / z.numel(), torch.ones((), device="cuda")  # the output's and each loss's gradient
    steps: dict[str, Callable] = {}

    def fresh() -> VectorQuantizer:  # each timed variant its own layer (their EMA state apart)
        return VectorQuantizer(dim=d, codebook_size=k, check_finite=False).cuda().train()

    ours = fresh()
    compiled = torch.compile(ours, fullgraph=True)

    def step(q, x=z):
        def run():
            x.grad = None
            out = q(x)
            torch.autograd.backward([out.quantized, *out.losses.values()], [g, *[one] * len(out.losses)])
        return run

    steps["ours"], steps["ours_compiled"] = step(ours), step(compiled)
    graphed_step = step(torch.compile(fresh(), fullgraph=True, mode="reduce-overhead"))

    def run_graphed():  # each call a new step of torch.compile's CUDA graphs (its outputs may be overwritten)
        torch.compiler.cudagraph_mark_step_begin()
        graphed_step()

    steps["ours_compiled_graphs"] = run_graphed
    leaf = z.detach().clone().requires_grad_()  # (the graphs' warm-up runs on a side stream)
    steps["ours_graphed"] = lazy(lambda: step(torch.cuda.make_graphed_callables(fresh(), (leaf,)), leaf))
    # a leaf of its own: the eager runs before made z's gradient accumulator on the default stream
    steps["ours_graph"] = lazy_graph(step(fresh(), z.detach().clone().requires_grad_()))

    def unfused(run):  # the same step on the torch version of the straight-through output and the EMA update
        def call():
            enabled, _fused.ENABLED = _fused.ENABLED, False
            try:
                run()
            finally:
                _fused.ENABLED = enabled
        return call

    steps["ours_unfused"] = unfused(step(fresh()))
    steps["ours_unfused_compiled"] = unfused(step(torch.compile(fresh(), fullgraph=True)))  # (traced with it off)
    steps["ours_unfused_graph"] = lazy_graph(unfused(step(fresh(), z.detach().clone().requires_grad_())))
    flat = z.detach().reshape(-1, d)
    steps["search"] = lambda: nearest_codes_triton(flat, ours.codebook.detach(), return_dist=False)
    steps["search_graph"] = lazy_graph(steps["search"])
    if vqp_cls is not None:
        def step_theirs(layer):
            def run():
                z.grad = None
                q, _, loss = layer(z)
                torch.autograd.backward([q, loss], [g, one])
            return run

        def theirs():
            return vqp_cls(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25).cuda().train()

        steps["vqp"] = step_theirs(theirs())
        steps["vqp_compiled"] = step_theirs(torch.compile(theirs()))  # (graph breaks allowed: theirs has host syncs)
    return steps
