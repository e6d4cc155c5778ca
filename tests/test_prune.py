"""Pruned checkpoints load in transformers and vLLM, and vLLM's surprisal matches transformers.

The strong check is independent of `actclient prune`'s own code: the source model is loaded in
transformers and its `nn.ModuleList` of decoder layers is cut by hand; the pruned checkpoint
must give exactly the same logits. One plain vLLM server (the pruned SmolLM2) serves the
surprisal check.

Tolerance of the vLLM-vs-transformers surprisal check: vLLM computes in bfloat16 (the
checkpoint's dtype), the reference in float32 from the same bf16 weights. bf16 keeps 8
significant bits, so logits of size 10-30 carry rounding errors of about 0.1 each, and 27
layers compound them; transformers' own bf16 forward is the yardstick. vLLM must stay within
twice transformers-bf16's worst per-token error (plus 0.05 nats), and its mean surprisal within
1% of float32's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actclient.cli import main as actclient
from actclient.evaluate import DEFAULT_TEXTS, evaluate, load_texts
from actclient.prune import PROVENANCE_KEY, kept_tensor_names
from actpipeline.prune_experiment import PLAIN_ENV, SERVE_ARGS
from vllm_activations.process import ServerProcess

pytestmark = pytest.mark.integration

SMOLLM2_DROP = [3, 13, 14, 25]


def _prune(source: Path, out: Path, dropped: list[int]) -> Path:
    code = actclient(
        ["prune", str(source), "--drop-layers", ",".join(map(str, dropped)), "--out", str(out)]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pruned_smollm2(embedded_models, tmp_path_factory) -> Path:
    return _prune(
        embedded_models["smollm2"], tmp_path_factory.mktemp("pruned") / "smollm2", SMOLLM2_DROP
    )


def _hand_pruned(source: Path, dropped: list[int], dtype):
    """The source model in transformers with the dropped decoder layers cut out by hand."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in dropped]
    model.model.layers = torch.nn.ModuleList(kept)
    for new, layer in enumerate(kept):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(kept)
    return model.eval()


def test_kept_layers_equal_source(embedded_models, pruned_smollm2: Path) -> None:
    import torch
    from safetensors import safe_open

    source = embedded_models["smollm2"]
    with (
        safe_open(source / "model.safetensors", framework="pt") as src,
        safe_open(pruned_smollm2 / "model.safetensors", framework="pt") as dst,
    ):
        mapping = kept_tensor_names(list(src.keys()), SMOLLM2_DROP)
        assert sorted(dst.keys()) == sorted(mapping.values())
        for old, new in mapping.items():
            a, b = src.get_tensor(old), dst.get_tensor(new)
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), new
    config = json.loads((pruned_smollm2 / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 - len(SMOLLM2_DROP)
    assert config[PROVENANCE_KEY]["dropped_layers"] == SMOLLM2_DROP


@pytest.mark.parametrize(
    ("name", "dropped"), [("smollm2", SMOLLM2_DROP), ("tiny-qwen3-untied", [1, 2])]
)
def test_transformers_loads_the_pruned_model_like_hand_surgery(
    embedded_models, pruned_smollm2: Path, tmp_path: Path, name: str, dropped: list[int]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = embedded_models[name]
    pruned = pruned_smollm2 if name == "smollm2" else _prune(source, tmp_path / name, dropped)
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    assert tokenizer.chat_template  # the chat template came along
    ids = tokenizer(load_texts(DEFAULT_TEXTS)[0].text, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    assert len(model.model.layers) == model.config.num_hidden_layers
    if "layer_types" in json.loads((pruned / "config.json").read_text()):
        assert len(model.config.layer_types) == model.config.num_hidden_layers
    reference = _hand_pruned(source, dropped, torch.float32)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        want = reference(ids, use_cache=False).logits
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def width_pruned_smollm2(embedded_models, tmp_path_factory) -> Path:
    """SmolLM2 without SMOLLM2_DROP, with MLP neurons, a query head per KV group and hidden
    channels cut: every dimension prune applies, in the one model vLLM serves."""
    source = embedded_models["smollm2"]
    config = json.loads((source / "config.json").read_text())
    plan = _width_plan(config, SMOLLM2_DROP, {"mlp": 96, "heads": 1, "hidden": 36}, seed=7)
    _cut_quiet_hidden(plan, source)
    # FLAP biases too (mlp_bias, attention_bias): vLLM's Llama must load and apply them.
    work = tmp_path_factory.mktemp("width-pruned")
    texts = [t.text for t in load_texts(DEFAULT_TEXTS)[:4]]
    plan["analysis"] = str(_channel_stats_analysis(source, texts, work / "analysis"))
    return _prune_widths(source, plan, work, ("--bias-compensation",))


def _cut_quiet_hidden(plan: dict, source: Path) -> None:
    """Random hidden channels can take a massive-activation channel and leave a model whose
    surprisal is noise (bf16 vs fp32 then differs by nats); cut the embedding's quietest."""
    from actclient.analysis.embedding import Checkpoint

    entry = plan["budget"]["strategies"]["joint"]
    checkpoint = Checkpoint(source)
    embed = checkpoint.tensor(checkpoint.find("embed_tokens.weight"))
    quiet = np.argsort(np.linalg.norm(embed, axis=0), kind="stable")[
        : len(entry["hidden"]["pruned"])
    ]
    entry["hidden"]["pruned"] = sorted(quiet.tolist())


def test_vllm_serves_the_pruned_model_and_its_surprisal_matches_transformers(
    width_pruned_smollm2: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    pruned_smollm2 = width_pruned_smollm2

    server = ServerProcess(
        pruned_smollm2, tmp_path / "server", SERVE_ARGS, plain=True, env=PLAIN_ENV
    )
    try:
        server.wait_ready()
        result = evaluate(server.url, load_texts(DEFAULT_TEXTS)[:3], api_key=server.api_key)
    finally:
        server.stop()
    assert result["model_path"] == str(pruned_smollm2)
    config = json.loads((pruned_smollm2 / "config.json").read_text())
    assert config["mlp_bias"] and config["attention_bias"]  # served with FLAP's biases
    models = {
        dtype: AutoModelForCausalLM.from_pretrained(pruned_smollm2, dtype=dtype).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }
    for text in result["per_text"]:
        ids = torch.tensor([text["token_ids"]])
        target = ids[0, 1:]
        surprisal = {}
        with torch.no_grad():
            for dtype, model in models.items():
                logp = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), -1)
                surprisal[dtype] = -logp[torch.arange(len(target)), target].double()
        vllm = torch.tensor(text["surprisal"], dtype=torch.float64)
        ref = surprisal[torch.float32]
        vllm_err = (vllm - ref).abs().max().item()
        hf_bf16_err = (surprisal[torch.bfloat16] - ref).abs().max().item()
        mean_rel = abs(vllm.mean().item() - ref.mean().item()) / ref.mean().item()
        print(
            f"{text['id']}: {len(target)} tokens, vLLM bf16 vs HF fp32 max |diff| "
            f"{vllm_err:.3f} nats (HF bf16: {hf_bf16_err:.3f}), mean surprisal rel diff "
            f"{mean_rel:.2e}"
        )
        assert vllm_err <= 2 * hf_bf16_err + 0.05
        assert mean_rel < 0.01


def test_neuron_pruned_model_equals_hand_sliced_mlps(embedded_models, tmp_path: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    source = embedded_models["tiny-qwen3-tied"]
    width = json.loads((source / "config.json").read_text())["intermediate_size"]
    rng = np.random.default_rng(0)
    pruned_neurons = {
        layer: sorted(rng.choice(width, 96, replace=False).tolist()) for layer in range(4)
    }
    plan = {
        "layers": {"num_layers": 4, "strategies": {}},
        "neurons": {
            "mlp": {
                "intermediate_size_before": width,
                "layers": [{"layer": k, "pruned": v} for k, v in pruned_neurons.items()],
            }
        },
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "pruned"
    code = actclient(
        ["prune", str(source), str(tmp_path / "plan.json"), "--drop-layers", "2", "--neurons",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.intermediate_size == width - 96
    reference = _hand_pruned(source, [2], torch.float32)
    for layer, block in zip([0, 1, 3], reference.model.layers, strict=True):
        keep = torch.tensor(np.setdiff1d(np.arange(width), pruned_neurons[layer]))
        mlp = block.mlp
        for name in ("gate_proj", "up_proj"):
            getattr(mlp, name).weight = torch.nn.Parameter(getattr(mlp, name).weight[keep])
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, keep])
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 1000, 3]])
    with torch.no_grad():
        assert torch.equal(
            model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits
        )


def _width_plan(config: dict, dropped: list[int], cut: dict, seed: int) -> dict:
    """A budget plan with one strategy that cuts `cut` MLP neurons, query heads per KV group
    and hidden channels, the choices drawn at random (prune must apply any choice)."""
    rng = np.random.default_rng(seed)
    layers, inter, hidden = (
        config["num_hidden_layers"],
        config["intermediate_size"],
        config["hidden_size"],
    )
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    group = heads // kv
    kept = [k for k in range(layers) if k not in dropped]
    widths = {
        "num_hidden_layers": len(kept),
        "intermediate_size": inter - cut["mlp"],
        "num_attention_heads": (group - cut["heads"]) * kv,
        "num_key_value_heads": kv,
        "head_dim": config["head_dim"],
        "hidden_size": hidden - cut["hidden"],
    }
    entry = {
        "widths": widths,
        "dropped_layers": dropped,
        "kept_layers": kept,
        "mlp": {
            "layers": [
                {"layer": k, "pruned": sorted(rng.choice(inter, cut["mlp"], False).tolist())}
                for k in kept
            ]
        },
        "heads": {
            "layers": [
                {
                    "layer": k,
                    "pruned": sorted(
                        g * group + int(h)
                        for g in range(kv)
                        for h in rng.choice(group, cut["heads"], False)
                    ),
                }
                for k in kept
            ]
        },
        "hidden": {"pruned": sorted(rng.choice(hidden, cut["hidden"], False).tolist())},
    }
    source_shape = {k: config[k] for k in widths}
    source_shape["num_hidden_layers"] = layers
    source_shape["intermediate_size"], source_shape["hidden_size"] = inter, hidden
    source_shape["num_attention_heads"] = heads
    return {"budget": {"source_shape": source_shape, "strategies": {"joint": entry}}}


def _hand_sliced(source: Path, plan: dict, dtype):
    """The source model in transformers, every plan dimension cut by hand with torch indexing."""
    import torch

    entry = plan["budget"]["strategies"]["joint"]
    model = _hand_pruned(source, entry["dropped_layers"], dtype)
    cfg = model.config
    hidden = torch.tensor(np.setdiff1d(np.arange(cfg.hidden_size), entry["hidden"]["pruned"]))
    d, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads

    def cut(module, rows=None, cols=None) -> None:
        w = module.weight
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        module.weight = torch.nn.Parameter(w.contiguous())

    cut(model.model.embed_tokens, cols=hidden)
    if not cfg.tie_word_embeddings:
        cut(model.lm_head, cols=hidden)
    else:
        model.lm_head.weight = model.model.embed_tokens.weight
    cut(model.model.norm, rows=hidden)
    mlp_rows = {r["layer"]: r["pruned"] for r in entry["mlp"]["layers"]}
    head_rows = {r["layer"]: r["pruned"] for r in entry["heads"]["layers"]}
    inter = cfg.intermediate_size
    for old, block in zip(entry["kept_layers"], model.model.layers, strict=True):
        neurons = torch.tensor(np.setdiff1d(np.arange(inter), mlp_rows[old]))
        heads = np.setdiff1d(np.arange(cfg.num_attention_heads), head_rows[old])
        channels = torch.tensor((heads[:, None] * d + np.arange(d)).ravel())
        attn, mlp = block.self_attn, block.mlp
        cut(block.input_layernorm, rows=hidden)
        cut(block.post_attention_layernorm, rows=hidden)
        cut(attn.q_proj, rows=channels, cols=hidden)
        cut(attn.k_proj, cols=hidden)
        cut(attn.v_proj, cols=hidden)
        cut(attn.o_proj, rows=hidden, cols=channels)
        attn.num_key_value_groups = len(heads) // cfg.num_key_value_heads
        cut(mlp.gate_proj, rows=neurons, cols=hidden)
        cut(mlp.up_proj, rows=neurons, cols=hidden)
        cut(mlp.down_proj, rows=hidden, cols=neurons)
    assert group > 1
    return model


def _prune_widths(source: Path, plan: dict, tmp_path: Path, extra: tuple = ()) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "pruned"
    code = actclient(
        ["prune", str(source), str(tmp_path / "plan.json"), "--budget-strategy", "joint",
         "--out", str(out), *extra]
    )  # fmt: skip
    assert code == 0
    return out


# (name, dropped layers, cuts): SmolLM2's hidden size stays a multiple of its 6 kept heads
WIDTH_CASES = [
    ("smollm2", [13, 25], {"mlp": 96, "heads": 1, "hidden": 36}),
    ("tiny-qwen3-untied", [2], {"mlp": 64, "heads": 1, "hidden": 24}),
    ("tiny-qwen3-tied", [], {"mlp": 32, "heads": 1, "hidden": 8}),
]


@pytest.mark.parametrize(("name", "dropped", "cut"), WIDTH_CASES)
def test_width_pruned_model_equals_hand_surgery(
    embedded_models, tmp_path: Path, name: str, dropped: list[int], cut: dict
) -> None:
    """Layers, MLP neurons, query heads (the same count in every KV group) and hidden channels:
    the pruned checkpoint gives the logits of the source with every tensor cut by hand, and
    holds exactly the parameters `plan` counts for its config."""
    import torch
    from transformers import AutoModelForCausalLM

    from actclient.analysis.params import count_parameters

    source = embedded_models[name]
    config = json.loads((source / "config.json").read_text())
    plan = _width_plan(config, dropped, cut, seed=len(name))
    out = _prune_widths(source, plan, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    widths = plan["budget"]["strategies"]["joint"]["widths"]
    for key, value in widths.items():
        assert getattr(model.config, key) == value, key
    pruned_config = json.loads((out / "config.json").read_text())
    assert count_parameters(pruned_config) == sum(p.numel() for p in model.parameters())
    reference = _hand_sliced(source, plan, torch.float32)
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 1000, 3]])
    with torch.no_grad():
        assert torch.equal(
            model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits
        )


def _channel_stats_analysis(source: Path, texts: list[str], out: Path) -> Path:
    """An analysis directory holding only the channel statistics FLAP needs (per layer sum and
    count of the down_proj and o_proj inputs), measured with transformers hooks in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    layers = len(model.model.layers)
    sums: dict[str, list] = {"mlp_intermediate": [0.0] * layers, "attn_heads": [0.0] * layers}
    counts = {kind: np.zeros(layers, dtype=np.int64) for kind in sums}

    def hook(kind: str, layer: int):
        def add(_module, inputs) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[kind][layer] = sums[kind][layer] + x.sum(0).numpy()
            counts[kind][layer] += x.shape[0]

        return add

    for i, block in enumerate(model.model.layers):
        block.mlp.down_proj.register_forward_pre_hook(hook("mlp_intermediate", i))
        block.self_attn.o_proj.register_forward_pre_hook(hook("attn_heads", i))
    with torch.no_grad():
        for text in texts:
            model(tokenizer(text, return_tensors="pt").input_ids, use_cache=False)
    arrays = out / "arrays"
    arrays.mkdir(parents=True)
    for kind in sums:
        np.save(arrays / f"channel_stats_{kind}_layers.npy", np.arange(layers))
        np.save(arrays / f"channel_stats_{kind}_sum.npy", np.stack(sums[kind]))
        np.save(arrays / f"channel_stats_{kind}_count.npy", counts[kind])
    return out


def _compensate_by_hand(model, source: Path, plan: dict, analysis: Path) -> None:
    """FLAP in torch on a hand-sliced model: bias(down_proj, o_proj) = the source weight's
    removed columns @ the removed channels' means (float64, rounded to bf16 as stored), then
    cut to the kept hidden channels; zero biases on gate/up and q/k/v."""
    import torch
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    entry = plan["budget"]["strategies"]["joint"]
    arrays = analysis / "arrays"
    cfg = full.config
    hidden = torch.tensor(np.setdiff1d(np.arange(cfg.hidden_size), entry["hidden"]["pruned"]))
    d = cfg.head_dim
    removed = {
        "mlp_intermediate": {r["layer"]: r["pruned"] for r in entry["mlp"]["layers"]},
        "attn_heads": {
            r["layer"]: (np.asarray(r["pruned"])[:, None] * d + np.arange(d)).ravel().tolist()
            for r in entry["heads"]["layers"]
        },
    }

    def bias(weight, kind: str, layer: int):
        mean = (
            np.load(arrays / f"channel_stats_{kind}_sum.npy")[layer]
            / np.load(arrays / f"channel_stats_{kind}_count.npy")[layer]
        )
        cols = torch.tensor(removed[kind][layer])
        value = weight.double()[:, cols] @ torch.from_numpy(mean).double()[cols]
        return torch.nn.Parameter(value.float().bfloat16().float()[hidden])

    for old, block in zip(entry["kept_layers"], model.model.layers, strict=True):
        src = full.model.layers[old]
        mlp, attn = block.mlp, block.self_attn
        mlp.down_proj.bias = bias(src.mlp.down_proj.weight, "mlp_intermediate", old)
        attn.o_proj.bias = bias(src.self_attn.o_proj.weight, "attn_heads", old)
        for module in (mlp.gate_proj, mlp.up_proj, attn.q_proj, attn.k_proj, attn.v_proj):
            module.bias = torch.nn.Parameter(torch.zeros(module.weight.shape[0]))


def test_bias_compensation_equals_hand_surgery_and_brings_logits_closer(
    embedded_models, tmp_path: Path
) -> None:
    """FLAP on SmolLM2 (a Llama): the compensated checkpoint loads in transformers with
    mlp_bias and attention_bias, equals hand surgery exactly, and its logits on the texts the
    means came from are closer to the unpruned model's than the uncompensated checkpoint's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = embedded_models["smollm2"]
    texts = [t.text for t in load_texts(DEFAULT_TEXTS)]
    analysis = _channel_stats_analysis(source, texts[:4], tmp_path / "analysis")
    config = json.loads((source / "config.json").read_text())
    plan = _width_plan(config, [13, 25], {"mlp": 384, "heads": 1, "hidden": 36}, seed=3)
    _cut_quiet_hidden(plan, source)
    plan["analysis"] = str(analysis)
    plain = _prune_widths(source, plan, tmp_path / "plain")
    compensated = _prune_widths(source, plan, tmp_path / "flap", ["--bias-compensation"])
    pruned_config = json.loads((compensated / "config.json").read_text())
    assert pruned_config["mlp_bias"] and pruned_config["attention_bias"]
    assert pruned_config[PROVENANCE_KEY]["bias_compensation"]["projections"] == [
        "down_proj",
        "o_proj",
    ]
    model = AutoModelForCausalLM.from_pretrained(compensated, dtype=torch.float32).eval()
    from actclient.analysis.params import count_parameters

    assert count_parameters(pruned_config) == sum(p.numel() for p in model.parameters())
    reference = _hand_sliced(source, plan, torch.float32)
    _compensate_by_hand(reference, source, plan, analysis)
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    without = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    kl: dict[str, list[float]] = {"with": [], "without": [], "held-out with": [],
                                  "held-out without": []}  # fmt: skip
    for n, text in enumerate(texts[:6]):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            got = model(ids, use_cache=False).logits
            assert torch.equal(got, reference(ids, use_cache=False).logits)
            want = torch.log_softmax(dense(ids, use_cache=False).logits[0], -1)
            for name, logits in (("with", got), ("without", without(ids, use_cache=False).logits)):
                logp = torch.log_softmax(logits[0], -1)
                key = name if n < 4 else f"held-out {name}"
                kl[key].append(float((want.exp() * (want - logp)).sum(-1).mean()))
    mean = {key: float(np.mean(v)) for key, v in kl.items()}
    print("mean KL(dense || pruned) per token, nats: " + ", ".join(
        f"{key} {value:.4f}" for key, value in mean.items()))  # fmt: skip
    assert mean["with"] < mean["without"]


def test_bias_compensation_refuses_qwen3(embedded_models, tmp_path: Path, capsys) -> None:
    source = embedded_models["tiny-qwen3-untied"]
    config = json.loads((source / "config.json").read_text())
    plan = _width_plan(config, [], {"mlp": 32, "heads": 1, "hidden": 0}, seed=0)
    plan["analysis"] = str(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code = actclient(
        ["prune", str(source), str(tmp_path / "plan.json"), "--budget-strategy", "joint",
         "--bias-compensation", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "model_type 'qwen3'" in err and "vLLM's Qwen3 builds o_proj without a bias" in err
    assert not (tmp_path / "out").exists()


def test_bf16_bias_rounding_matches_torch() -> None:
    import torch

    from actclient.prune import _encoded

    values = np.random.default_rng(0).normal(size=4096) * np.logspace(-6, 3, 4096)
    _, _, write = _encoded(values, "BF16", [])

    class Sink:
        data = b""

        def write(self, chunk: bytes) -> None:
            self.data += chunk

    sink = Sink()
    write(sink)
    want = torch.from_numpy(values).float().bfloat16().view(torch.int16).numpy().view("<u2")
    assert sink.data == want.tobytes()
