"""Testbed v2: the DINOv2-tower model, its cached features and its trainer, in miniature.

The tower is the real converted DINOv2 (cached in a temporary folder); the decoder is shrunk so
that a few training steps take seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenprune_lab.testbed import model as tb_model
from tokenprune_lab.testbed.features import FeaturePool, pool_scene
from tokenprune_lab.testbed.questions import AUX_KINDS, ask_aux
from tokenprune_lab.testbed.train_v2 import TrainConfigV2, train_v2

MINI = {"text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 2}}


def _cfg(tmp, **kw) -> TrainConfigV2:
    base = dict(steps=4, batch=2, pool=8, chunk=4, val_scenes=4, val_every=2, log_every=2, checkpoint_every=2,
                warmup=2, arch=MINI, check_scenes=2, features=str(tmp / "features"))
    return TrainConfigV2(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    record = train_v2(_cfg(tmp), tmp / "run", log=lambda *_: None)
    return tmp, record


def test_miniature_training_finishes_with_a_curve_and_a_check(trained):
    tmp, record = trained
    assert record["finished"] and record["step"] == 4
    assert [p["step"] for p in record["curve"]] == [2, 4]
    assert all("val" in p and 0 <= p["val"]["overall"] <= 1 for p in record["curve"])
    assert set(record["check"]["per_class"]) >= {"overall"}
    saved = json.loads((tmp / "run" / "training.json").read_text())
    assert saved["check"]["predictions"] == record["check"]["predictions"]


def test_training_curve_plots_from_the_run_and_from_a_checkpoint(trained, tmp_path):
    from tokenprune.cli import main

    tmp, _ = trained
    for source in (tmp / "run", tmp / "run" / "checkpoint.pt"):
        out = tmp_path / f"{source.name}.png"
        assert main(["testbed", "curve", "--model", str(source), "--out", str(out)]) == 0
        assert out.stat().st_size > 10_000


def test_saved_weights_leave_the_tower_out_and_load_back_exactly(trained):
    tmp, _ = trained
    own = load_file(str(tmp / "run" / "model.safetensors"))
    assert own and not any(k.startswith("model.vision_tower.") for k in own)
    model, processor = tb_model.load(tmp / "run")
    assert tb_model.tower_kind(model.config) == "dinov2"
    state = model.state_dict()
    for k, v in own.items():
        assert torch.equal(state[k], v), k
    # the tower is the pretrained one, and the image processor uses ImageNet statistics
    assert torch.equal(model.model.vision_tower.embeddings.cls_token,
                       tb_model.build(0, arch=tb_model.arch_with(MINI, base=tb_model.ARCH_V2))[0]
                       .model.vision_tower.embeddings.cls_token)
    assert tuple(processor.image_processor.image_mean) == tb_model.normalisation("dinov2")[0]


def test_pause_and_resume_gives_identical_weights(tmp_path, trained):
    tmp, _ = trained
    cfg = _cfg(tmp)
    train_v2(cfg, tmp_path / "paused", log=lambda *_: None, max_minutes=0.0)  # stops at the first checkpoint
    first = torch.load(tmp_path / "paused" / "checkpoint.pt", weights_only=False)
    assert first["state"]["step"] == 2
    train_v2(cfg, tmp_path / "paused", log=lambda *_: None)
    a = torch.load(tmp_path / "paused" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp / "run" / "checkpoint.pt", weights_only=False)
    assert a["state"]["curve"] == b["state"]["curve"] or all(
        {k: v for k, v in p.items() if k != "seconds"} == {k: v for k, v in q.items() if k != "seconds"}
        for p, q in zip(a["state"]["curve"], b["state"]["curve"], strict=True))
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_cached_features_equal_the_towers_own(trained):
    tmp, _ = trained
    model, processor = tb_model.load(tmp / "run")
    pool = FeaturePool(tmp / "features", model, processor, 8, chunk=4)
    got = pool.features([5, 1])
    pv = processor.image_processor([pool_scene(5).image, pool_scene(1).image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-3)  # float16 storage


def test_a_pool_of_another_layer_is_refused(trained):
    tmp, _ = trained
    model, processor = tb_model.load(tmp / "run")
    model.config.vision_feature_layer = -1
    with pytest.raises(ValueError, match="another tower or layer"):
        FeaturePool(tmp / "features", model, processor, 8, chunk=4).build(lambda *_: None)


def test_auxiliary_questions_are_answerable_from_the_scene():
    for i in range(30):
        s = pool_scene(i)
        qs = ask_aux(s, 2)
        assert {q.klass for q in qs} <= {"aux:" + k for k in AUX_KINDS}
        for q in qs:
            kind = q.klass[4:]
            if kind == "objects":
                assert q.answer == str(len(s.objects))
            elif kind == "digit":
                assert q.answer in f"{s.number:02d}"
            elif kind in ("row", "column"):
                name = q.text.split("the ")[1].split(" in")[0].rstrip("?")
                o = next(o for o in s.objects if f"{o.color} {o.shape}" == name)
                assert q.answer == str(o.row if kind == "row" else o.col)
        tok = tb_model.build_tokenizer()
        assert all(tok.unk_token_id not in tok(q.text)["input_ids"] for q in qs)


def test_a_bf16_tail_trains_resumes_exactly_and_saves_fp32(tmp_path, trained):
    tmp, _ = trained
    cfg = _cfg(tmp, bf16_from=2)
    straight = train_v2(cfg, tmp_path / "straight", log=lambda *_: None)
    train_v2(cfg, tmp_path / "paused", log=lambda *_: None, max_minutes=0.0)
    train_v2(cfg, tmp_path / "paused", log=lambda *_: None)
    a = torch.load(tmp_path / "paused" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert straight["config"]["bf16_from"] == 2
    fp32 = torch.load(tmp / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert any(not torch.equal(b[k], fp32[k]) for k in b)  # the autocast did change steps 2-3
    own = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in own.values())


def test_the_saved_projector_reads_raw_features_as_training_read_gained_ones(trained):
    """Training feeds the projector ``feature_gain`` x the tower features; the saved model has the
    gain folded into its first layer, so a plain LLaVA forward on the tower's own features gives
    what the trained (checkpoint) projector gave on the gained ones."""
    tmp, record = trained
    gain = record["config"]["feature_gain"]
    assert gain != 1.0  # the default recipe uses a gain, so this test can fail
    saved, _ = tb_model.load(tmp / "run")
    trained_form, _ = tb_model.build(0, arch=tb_model.arch_with(MINI, base=tb_model.ARCH_V2))
    trained_form.load_state_dict(torch.load(tmp / "run" / "checkpoint.pt", weights_only=False)["model"], strict=False)
    feats = FeaturePool(tmp / "features", saved, None, 8, chunk=4).features([0, 3])  # (B, M, Dv)
    with torch.no_grad():
        got = saved.model.multi_modal_projector(feats)
        ref = trained_form.model.multi_modal_projector(gain * feats)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, trained_form.model.multi_modal_projector(feats), atol=1e-2)


def test_resuming_under_another_feature_gain_is_refused(tmp_path, trained):
    tmp, _ = trained
    train_v2(_cfg(tmp), tmp_path / "run", log=lambda *_: None, max_minutes=0.0)
    with pytest.raises(ValueError, match="feature_gain = 20.0, this run asks for 1.0"):
        train_v2(_cfg(tmp, feature_gain=1.0), tmp_path / "run", log=lambda *_: None)
