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
    from genbounds.callbacks.dispersion import row_ring

    before = (ghost_conv._conv_patch_gram, ghost_conv._Scratch.get, gd.squared_pieces, row_ring.RowRing.lend)
    with oc.cuda_paths():
        assert ghost_conv._conv_patch_gram is not before[0] and gd.squared_pieces is not before[2]
        assert row_ring.RowRing.lend is not before[3]
        gpu = oc.count_step(build, batches, measured=True)
    assert (ghost_conv._conv_patch_gram, ghost_conv._Scratch.get, gd.squared_pieces, row_ring.RowRing.lend) == before
    cpu = oc.count_step(build, batches, measured=True)
    # on the CPU a measured step writes raw values only, into the row ring (dispersion/row_ring.py):
    # two row norms a Linear layer in the backward (‖δ_i‖, ‖a_i‖; nothing squared there), the
    # gradient's large tensors' piece norms (two), its small tensors' piece norms where they lie
    # (four: three biases and the last layer's weight, a view of it; no copy into a padded buffer,
    # functional._PiecePlan) — nothing else; the rows are made later
    extra = {k: v for k, v in (cpu - plain).items() if v}
    assert extra == {("linalg_vector_norm", ""): 12, ("view", ""): 3}, extra
    # off the CPU (no ring) each step's rows are made at its optimizer step: the three Linear
    # layers' rows from their row norms in one addcmul and two products, the gradient in one norm
    gpu_extra = gpu - plain
    assert gpu_extra[("linalg_vector_norm", "")] == 6 and gpu_extra[("pow_", "")] == 0
    assert gpu_extra[("addcmul", "")] == 1 and gpu_extra[("mul_", "")] == 2
    assert gpu_extra[("_foreach_norm", "")] == 1 and gpu_extra[("_foreach_copy_", "")] == 0
    assert gpu_extra[("detach", "")] == 0  # a kept input is not detached in the forward
    by_line = oc.count_step(build, batches, measured=True, by_line=True)
    assert any(where.startswith("estimators/ghost_norms/linear.py:") for _, where in by_line)
