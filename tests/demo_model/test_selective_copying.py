"""The shipped selective-copying model (Mamba paper section 4.1), exported and run through the runtime
(ONNX Runtime on the CPU, greedy), solves freshly drawn instances like the reference model does:
>= 99 % per-token accuracy for both, and the same predictions."""
import os

import numpy as np
import pytest
import torch

from mamba_rt.demo import COPYING_MODEL_DIR

pytest.importorskip("onnx", reason="onnx is needed to export")
pytest.importorskip("onnxruntime", reason="onnxruntime runs the portable graphs")

from mamba_rt.demo_train import COPY_MARKER, COPY_REGION, COPY_TOKENS, copying_batch  # noqa: E402
from mamba_rt.exporters.export import export_package  # noqa: E402
from mamba_rt.exporters.model import load_model  # noqa: E402
from mamba_rt.runtime import Session  # noqa: E402

N = 256  # fresh instances: 4096 answer tokens
SLOTS = 64


def test_exported_graph_solves_selective_copying_like_the_reference(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")  # never the training seed's stream
    ids, answers = copying_batch(N, torch.Generator().manual_seed(seed))
    assert ids.shape == (N, COPY_REGION + COPY_TOKENS)

    model = load_model(COPYING_MODEL_DIR, "fp32", "cpu")
    with torch.no_grad():
        ref_pred = model(ids)[0][:, -COPY_TOKENS:].argmax(-1).numpy()

    pkg = export_package(COPYING_MODEL_DIR, tmp_path / "pkg", dtype="fp32")
    rt_pred = np.zeros((N, COPY_TOKENS), np.int64)
    with Session.open(pkg, backend="onnxruntime", device="cpu", max_batch=SLOTS) as s:
        for a in range(0, N, SLOTS):
            slots = s.alloc(SLOTS)
            # prefill the region and the first marker; then one decode step per further marker
            for i, slot in enumerate(slots):
                rt_pred[a + i, 0] = int(np.argmax(s.prefill(slot, ids[a + i, :COPY_REGION + 1].numpy(),
                                                            return_logits=True)))
            for k in range(1, COPY_TOKENS):
                logits = s.step(slots, np.full(len(slots), COPY_MARKER), return_logits=True)
                rt_pred[a:a + SLOTS, k] = logits.argmax(-1)
            for slot in slots:
                s.free(slot)

    ans = answers.numpy()
    ref_acc = float((ref_pred == ans).mean())
    rt_acc = float((rt_pred == ans).mean())
    agree = float((rt_pred == ref_pred).mean())
    msg = (f"seed {seed}: per-token accuracy reference {ref_acc:.5f}, exported graph via runtime {rt_acc:.5f}, "
           f"agreement {agree:.5f} ({ans.size} tokens)")
    print(msg)
    assert ref_acc >= 0.99 and rt_acc >= 0.99, msg
    assert agree >= 0.999, msg
    assert abs(rt_acc - ref_acc) <= 1 / ans.size * 2, msg
