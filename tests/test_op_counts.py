"""``benchmarks/op_counts.py`` counts the ATen ops of one measured training step against plain, and
its run of our GPU branches on the CPU leaves the library as it found it."""

from __future__ import annotations

from helpers import benchmark_module


def test_counts_a_measured_step_and_restores_the_gpu_branches():
    oc = benchmark_module("op_counts")
    from genbounds.estimators.ghost_norms import conv as ghost_conv
    from genbounds.estimators import gradient_dispersion as gd

    build, make_batches = oc._models()["mlp"]
    batches = make_batches()
    plain = oc.count_step(build, batches, measured=False)
    assert plain == oc.count_step(build, batches, measured=False)  # a count, not a timing: repeatable
    before = (ghost_conv._conv_patch_gram, ghost_conv._Scratch.get, gd.squared_pieces)
    with oc.cuda_paths():
        assert ghost_conv._conv_patch_gram is not before[0] and gd.squared_pieces is not before[2]
        gpu = oc.count_step(build, batches, measured=True)
    assert (ghost_conv._conv_patch_gram, ghost_conv._Scratch.get, gd.squared_pieces) == before
    cpu = oc.count_step(build, batches, measured=True)
    for ours in (cpu, gpu):
        extra = ours - plain
        # the three Linear layers' Goodfellow norms, one op each (and on the CPU the gradient's
        # pieces squared in float64, one more)
        assert extra[("addcmul", "")] == (4 if ours is cpu else 3)
        assert extra[("_foreach_norm", "")] == 1  # the gradient's small tensors (CPU), all of it (GPU)
        assert extra[("detach", "")] == 0  # a kept input is not detached in the forward
    # the CPU takes the large tensors' norms in 1,024-element pieces, the GPU branch does not
    assert (cpu - plain)[("linalg_vector_norm", "")] > (gpu - plain)[("linalg_vector_norm", "")]
    by_line = oc.count_step(build, batches, measured=True, by_line=True)
    assert any(where.startswith("estimators/ghost_norms/linear.py:") for _, where in by_line)
