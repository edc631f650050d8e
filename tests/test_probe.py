"""probe(): records what the matcher computes on the layers' own q/k, changes nothing, cleans up."""
import pytest
import torch

from corrlab.errors import CorrlabError, ValueRangeError
from corrlab.model import CorrlabPipeline, MultiViewDiT
from corrlab.probing import AttentionTaps, match_tokens, probe

from matching_reference import assert_unambiguous

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2.0)
    with torch.no_grad():  # adaLN-zero layers start at 0: randomise them so prompts and attention matter
        for p in [model.proj_out.weight, model.ada_out[1].weight] + [b.ada[1].weight for b in model.blocks]:
            p.normal_(0.0, 0.2)
    return CorrlabPipeline(model)


def generate(pipe, guidance=2.0):
    return pipe("red striped box", num_views=3, num_inference_steps=STEPS, guidance_scale=guidance, seed=4, progress=False)


def hook_state(module):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), type(getattr(m, "processor", None)))
            for name, m in module.named_modules()]


def test_outputs_bit_identical_with_and_without_probe(pipe):
    before = generate(pipe)
    for options in ({}, {"similarity": "dual_softmax", "confidence": "window", "mutual": True, "heads": "mean"}):
        with probe(pipe, history=2, **options) as rec:
            probed = generate(pipe)
        assert torch.equal(before.images, probed.images)  # exact: same computation twice (the probe only reads)
        assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]  # each layer once, forward order
        assert rec.steps == list(range(STEPS))
    assert torch.equal(generate(pipe).images, before.images)  # exact: same computation twice


def test_hooks_gone_after_exception(pipe):
    state = hook_state(pipe.model)
    before = generate(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with probe(pipe) as rec:
            generate(pipe)
            raise RuntimeError("boom")
    assert rec.steps == list(range(STEPS))  # it did record before the exception
    assert hook_state(pipe.model) == state
    assert torch.equal(generate(pipe).images, before.images)  # exact: same computation twice


def test_record_equals_matching_the_captured_q_k(pipe):
    captured = {}

    def keep(call):
        if call.layer == "blocks.1.attn":
            captured[call.call_index] = (call.q[0].clone(), call.k[0].clone(), call.scale, call.timestep)

    with AttentionTaps(pipe, ["blocks.1.attn"], keep):
        generate(pipe)
    opts = dict(similarity="dual_softmax", confidence="window", window_radius=1, threshold=0.2)
    with probe(pipe, layers=["blocks.1.attn"], steps=[0, 2], chunk_size=5, **opts) as rec:
        mvs = generate(pipe)
    assert rec.steps == [0, 2]
    ts = pipe.timesteps(STEPS)
    torch.testing.assert_close(torch.tensor(rec.ds["timestep"].values, dtype=torch.float32), ts[[0, 2]])
    ds = rec.ds.sel(layer="blocks.1.attn")
    for step in (0, 2):
        q, k, scale, t = captured[step]  # one denoiser call per step
        for i in range(3):
            for j in range(3):
                if i == j:
                    assert (ds["match_row"].sel(step=step, src=i, tgt=j) == -1).all()
                    continue
                m = match_tokens(q[i], k[j], (4, 4), scale=scale, **opts)
                # the probe matched all targets at once in chunks of 5, this is one target in one chunk:
                # other matmul shapes, so exact index / kept comparison needs a case without near-ties
                assert_unambiguous(q[i], k[j], (4, 4), scale, opts["similarity"], "per_head", opts["confidence"],
                                   opts["threshold"], opts["window_radius"], False)
                sel = ds.sel(step=step, src=i, tgt=j)
                index = torch.from_numpy((sel["match_row"] * 4 + sel["match_col"]).values.reshape(2, 16)).long()
                assert torch.equal(index, m.index)
                assert torch.equal(torch.from_numpy(sel["kept"].values.reshape(2, 16)), m.kept)
                torch.testing.assert_close(torch.from_numpy(sel["confidence"].values.reshape(2, 16)), m.confidence)
                x = torch.from_numpy(sel["match_x"].values.reshape(2, 16)).double()
                # token centre, 4-px patches: computed on both sides, compared up to rounding
                torch.testing.assert_close(x, (m.index % 4).double() * 4 + 1.5, rtol=0, atol=1e-6)
    assert len(rec.cameras) == 3 and rec.prompt == "red striped box"


def test_batch_index_selects_the_conditional_branch(pipe):
    with probe(pipe, layers=["blocks.0.attn"], steps=[1]) as auto:
        generate(pipe)
    with probe(pipe, layers=["blocks.0.attn"], steps=[1], batch_index=0) as cond:
        generate(pipe)
    with probe(pipe, layers=["blocks.0.attn"], steps=[1], batch_index=1) as uncond:
        generate(pipe)
    # exact: same computation twice (the default picks batch entry 0: corrlab's pipeline stacks [cond, uncond])
    assert auto.ds["confidence"].equals(cond.ds["confidence"])
    assert not uncond.ds["confidence"].equals(cond.ds["confidence"])
    with pytest.raises(ValueRangeError, match="batch_index"):
        with probe(pipe, layers=["blocks.0.attn"], batch_index=1):
            generate(pipe, guidance=1.0)  # no CFG: a batch of one


def test_bad_arguments_raise_named_errors(pipe):
    with pytest.raises(CorrlabError, match="unknown options"):
        with probe(pipe, treshold=0.1):
            pass
    with pytest.raises(ValueRangeError, match="steps"):
        with probe(pipe, steps=[-1]):
            pass
    with pytest.raises(CorrlabError, match="layers"):
        with probe(pipe, layers=["blocks.9.attn"]):
            pass
    with pytest.raises(CorrlabError, match="similarity"):
        with probe(pipe, similarity="cosine"):
            pass


def test_probe_layers_lists_the_attention_layers(pipe):
    infos = probe.layers(pipe.model)
    assert [i.name for i in infos] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(i.grid == (4, 4) and i.num_heads == 2 for i in infos)


def test_cli_probe_then_score(pipe, tmp_path, capsys):
    import json

    from corrlab.cli import main
    from corrlab.probing import ProbeRecord
    from corrlab.sets import load_set

    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "set"
    argv = ["probe", "--prompt", "red striped box", "--seed", "2", "--model", str(tmp_path / "model"), "--views", "3",
            "--num-steps", "2", "--layers", "blocks.1.attn", "--threshold", "0.2", "--no-progress"]
    assert main(argv + ["--steps", "1", "--out", str(out)]) == 0
    rec, mvs = ProbeRecord.load(out / "record.nc"), load_set(out)
    assert rec.layers == ["blocks.1.attn"] and rec.steps == [1] and rec.matching["threshold"] == 0.2  # exact: stored option
    # exact: the same cameras stored twice (lossless round trips, no arithmetic)
    assert [c.K.tolist() for c in rec.cameras] == [c.K.tolist() for c in mvs.cameras] and rec.seed == 2
    capsys.readouterr()
    assert main(["score", str(out), "--json", "--baselines", "--thresholds", "2", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(set(r) == {"method", "layer", "step", "threshold", "precision", "n_correct", "n_matches", "note"}
               for r in rows)
    native = [r for r in rows if r["method"] == "native"]
    assert [(r["layer"], r["step"], r["threshold"]) for r in native] == [("blocks.1.attn", 1, 2.0), ("blocks.1.attn", 1, 5.0)]
    assert native[0]["n_matches"] == int(rec.ds["kept"].sum())
    assert {r["method"] for r in rows if r["layer"] is None} == {"chance", "identity", "appearance"}
    assert main(["score", str(out), "--baselines", "--controls", "identity"]) == 0
    table = capsys.readouterr().out
    assert "identity" in table and "blocks.1.attn" in table
    assert main(argv + ["--steps", "7", "--out", str(tmp_path / "none")]) == 2  # no such step: a clear error
    assert "--steps" in capsys.readouterr().err


def same_cameras(a, b):
    return len(a) == len(b) and all(torch.equal(x.K, y.K) and torch.equal(x.R, y.R) and torch.equal(x.t, y.t)
                                    and x.model == y.model for x, y in zip(a, b))


def test_probe_records_the_returned_set_without_set_meta(pipe):
    with probe(pipe, layers=["blocks.1.attn"], steps=[0]) as rec:
        mvs = generate(pipe)
    assert rec.prompt == mvs.prompt and rec.seed == mvs.seed == 4
    assert same_cameras(rec.cameras, mvs.cameras)  # exact: the set's own float64 values
    # what the ritual call would have given: the same record, value for value
    with probe(pipe, layers=["blocks.1.attn"], steps=[0]) as by_hand:
        generate(pipe)
    by_hand.set_meta(prompt=mvs.prompt, seed=mvs.seed, cameras=mvs.cameras)
    assert rec.equals(by_hand)
    assert pipe._output_observers == []  # the observer is gone after the block


def test_probe_observer_is_removed_on_exceptions_and_ignores_bare_models(pipe):
    with pytest.raises(RuntimeError, match="boom"):
        with probe(pipe, layers=["blocks.1.attn"], steps=[0]):
            raise RuntimeError("boom")
    assert pipe._output_observers == []
    after = generate(pipe)  # a later call outside any probe is seen by nobody
    with probe(pipe.model, layers=["blocks.1.attn"], steps=[0]) as rec:
        generate(pipe)  # the bare model cannot see the set: no cameras, set_meta is the way
    assert rec.cameras is None and rec.prompt is None
    with pytest.raises(CorrlabError, match="set_meta"):
        rec.require_cameras("scoring")
    rec.set_meta(prompt=after.prompt, seed=after.seed, cameras=after.cameras)
    assert same_cameras(rec.cameras, after.cameras)


def test_probe_keeps_the_first_set_and_warns_on_a_different_second_one(pipe):
    with pytest.warns(UserWarning, match="called again"):
        with probe(pipe, layers=["blocks.1.attn"], steps=[0]) as rec:
            first = generate(pipe)
            pipe("blue dotted sphere", num_views=3, num_inference_steps=1, seed=5, progress=False)
    assert rec.prompt == first.prompt and rec.seed == 4 and same_cameras(rec.cameras, first.cameras)


def test_probe_takes_one_matching_options_object(pipe):
    from corrlab.probing import MatchingOptions

    opts = MatchingOptions(heads="mean", threshold=0.2, history=2)
    with probe(pipe, layers=["blocks.1.attn"], steps=[1], matching=opts) as a:
        generate(pipe)
    with probe(pipe, layers=["blocks.1.attn"], steps=[1], heads="mean", threshold=0.2, history=2) as b:
        generate(pipe)
    assert a.equals(b)  # exact: the keyword form builds the same options, same computation twice
    assert {k: a.matching[k] for k in MatchingOptions.fields()} == opts.as_dict()
    assert a.ds.sizes["head"] == 1  # heads="mean": one match per token
    with probe(pipe, layers=["blocks.1.attn"], steps=[1], matching=opts, threshold=0.5) as c:
        generate(pipe)
    assert c.matching["threshold"] == 0.5 and c.matching["heads"] == "mean"  # keywords replace fields of matching
    with pytest.raises(CorrlabError, match="matching: expected None or a MatchingOptions"):
        with probe(pipe, matching={"heads": "mean"}):
            pass
