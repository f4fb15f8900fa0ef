"""The layer-wise engine against independent computations on real models."""

import torch

from compress.calibration.data import batches, calibration_tokens
from compress.calibration.layerwise import PlannedStage, run_layerwise
from compress.methods.magnitude import Magnitude
from compress.methods.sparsity import prune_mask
from compress.methods.wanda import Wanda, wanda_scores
from compress.model.load import load_model
from compress.model.targets import discover, select
from compress.recipe import CalibrationSpec, ModelSpec
from compress.state import CompressionState

CALIBRATION = CalibrationSpec(nsamples=16, seqlen=128, batch_size=8)


def _run_wanda(model_source, pattern="unstructured", sparsity=0.5, include=("*",)):
    loaded = load_model(ModelSpec(source=model_source))
    layout = discover(loaded.model)
    targets = select(layout.targets, list(include), [])
    method = Wanda(Wanda.Params(sparsity=sparsity, pattern=pattern))
    tokens, _ = calibration_tokens(CALIBRATION, loaded.tokenizer)
    state = CompressionState()
    outcome = run_layerwise(loaded.model, layout, [PlannedStage(method, targets)], state, batches(tokens, 8), loaded.device)
    return loaded, layout, state, outcome.stages[0], tokens


def test_wanda_mask_matches_independent_score():
    """Recompute Wanda's score for q_proj of blocks 0 and 1 by hand: the input of block 1 must be the
    output of the already pruned block 0 (as the reference does), and the mask must be identical."""
    loaded, layout, state, _, tokens = _run_wanda(None)
    dense = load_model(ModelSpec())
    model = loaded.model  # pruned: its block 0 is what block 1 saw during the run
    for block in (0, 1):
        name = f"model.layers.{block}.self_attn.q_proj"
        sq_norm = torch.zeros(model.config.hidden_size)
        with torch.no_grad():
            for batch in tokens.split(8):
                hidden = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[block]
                x = model.model.layers[block].input_layernorm(hidden).reshape(-1, sq_norm.numel())
                sq_norm += x.pow(2).sum(0)
        dense_weight = dense.model.get_submodule(name).weight.float()
        independent = wanda_scores(dense_weight, sq_norm)
        rows, cols = independent.shape
        expected = torch.ones(rows, cols, dtype=torch.bool)
        expected.scatter_(1, independent.argsort(dim=1, stable=True)[:, : cols // 2], False)
        assert torch.equal(state.mask(name), expected), f"{name}: engine mask differs from the independent Wanda mask"
        assert torch.equal(model.get_submodule(name).weight == 0, ~expected)


def test_moe_experts_are_per_expert_targets_with_routed_tokens(tiny_mixtral):
    loaded, layout, state, outcome, tokens = _run_wanda(str(tiny_mixtral), pattern="2:4")
    names = [t.name for t in layout.targets]
    assert "model.layers.0.mlp.experts.3.gate_up_proj" in names
    assert "model.layers.1.mlp.experts.0.down_proj" in names
    assert "model.layers.0.mlp.gate" in layout.left_out  # the router is never a target
    assert not any(".mlp.gate" in n and "experts" not in n for n in names)
    # every token goes to top-2 of 4 experts: the routed counts of a block's experts add up to 2 x tokens
    total = tokens.numel()
    routed = sum(outcome.tokens[f"model.layers.0.mlp.experts.{e}.gate_up_proj"] for e in range(4))
    assert routed == 2 * total
    for e in range(4):
        assert outcome.tokens[f"model.layers.0.mlp.experts.{e}.down_proj"] == outcome.tokens[f"model.layers.0.mlp.experts.{e}.gate_up_proj"]
    for target in layout.targets:
        weight = target.weight
        kept = (weight != 0).view(weight.shape[0], -1, 4).sum(-1)
        assert (kept <= 2).all(), target.name
        assert torch.equal(state.mask(target.name), weight != 0)


def test_encoder_blocks_and_targets(tiny_bert):
    loaded, layout, state, outcome, _ = _run_wanda(str(tiny_bert))
    assert loaded.kind == "encoder"
    assert layout.blocks_path == "encoder.layer"
    assert "pooler.dense" in layout.left_out
    assert len(layout.targets) == 2 * 6  # query, key, value, attention.output, intermediate, output
    for target in layout.targets:
        assert abs((target.weight == 0).float().mean().item() - 0.5) < 1e-6


def test_prune_mask_is_reused_by_the_engine():
    """The engine's mask for a layer equals the shared core called on the recorded statistic."""
    generator = torch.Generator().manual_seed(0)
    weight, sq_norm = torch.randn(8, 16, generator=generator), torch.rand(16, generator=generator)
    method = Wanda(Wanda.Params(sparsity=0.25))
    result = method.compress_target(weight, {"input_sq_norm": sq_norm}, None)
    assert torch.equal(result.mask, prune_mask(wanda_scores(weight, sq_norm), 0.25, "unstructured"))
    assert torch.equal(result.weight, weight * result.mask)


def test_wanda_without_statistics_falls_back_to_row_magnitude():
    """An expert no calibration token reached gets no statistics; Wanda then ranks |W| per row."""
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    result = Wanda(Wanda.Params(sparsity=0.5)).compress_target(weight, {}, None)
    assert torch.equal(result.mask, prune_mask(weight.abs(), 0.5, "unstructured", scope="row"))


def test_siblings_reading_one_input_share_its_statistics():
    """q/k/v read the same normed hidden states, gate/up too: their Hessian is computed once and
    equals X^T X of that input; o_proj and down_proj get their own."""
    from compress.calibration.capture import capture_block_inputs
    from compress.calibration.statistics import gather

    loaded = load_model(ModelSpec())
    layout = discover(loaded.model)
    tokens, _ = calibration_tokens(CALIBRATION, loaded.tokenizer)
    inputs = capture_block_inputs(loaded.model, layout, batches(tokens, 8), loaded.device)
    block = layout.blocks[0]
    targets = layout.by_block(layout.targets)[0]
    with torch.no_grad(), gather(targets, ("hessian",)) as collected:
        for item in inputs:
            block(item.hidden, *item.args, **item.kwargs)
    prefix = "model.layers.0."
    q = collected[prefix + "self_attn.q_proj"]
    assert collected[prefix + "self_attn.k_proj"].same_as is q and collected[prefix + "self_attn.v_proj"].same_as is q
    assert collected[prefix + "mlp.up_proj"].same_as is collected[prefix + "mlp.gate_proj"]
    assert collected[prefix + "self_attn.o_proj"].same_as is None and collected[prefix + "mlp.down_proj"].same_as is None
    x = torch.cat([block.input_layernorm(item.hidden).reshape(-1, block.input_layernorm.weight.numel()) for item in inputs]).float()
    assert torch.allclose(collected[prefix + "self_attn.v_proj"].values()["hessian"], x.T @ x, rtol=1e-4, atol=1e-3)
    assert collected[prefix + "self_attn.v_proj"].tokens == tokens.numel()


class _OneBlock(torch.nn.Module):
    """`designed` reads features 0-7 (its small-weight columns see large activations), `mixed` reads
    features 8-15 (random weights, activations of similar size: the exact ranking matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.designed = torch.nn.Linear(8, 4, bias=False)
        self.mixed = torch.nn.Linear(8, 6, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.designed(hidden[..., :8])
        self.mixed(hidden[..., 8:])
        return hidden


class _TinyModel(torch.nn.Module):
    """input_ids -> embedding (feature j scaled by `scale[j]`) -> one block: the engine's smallest model."""

    def __init__(self, scale: torch.Tensor, vocab: int = 64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Embedding(vocab, scale.numel())
        self.layers = torch.nn.ModuleList([_OneBlock()])
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, scale.numel(), generator=generator) * scale)
            # designed: columns 0-3 small weights (0.05-0.2), columns 4-7 large ones (0.5-1), random signs
            size = torch.rand(4, 8, generator=generator)
            small, large = 0.05 + 0.15 * size, 0.5 + 0.5 * size
            sign = torch.where(torch.rand(4, 8, generator=generator) < 0.5, -1.0, 1.0)
            self.layers[0].designed.weight.copy_(sign * torch.cat([small[:, :4], large[:, 4:]], dim=1))
            self.layers[0].mixed.weight.copy_(torch.randn(6, 8, generator=generator))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def test_wanda_uses_the_activation_norm_where_it_reverses_magnitude():
    """|W_ij| * ||X_j||_2 computed here from the inputs themselves, on a layer whose small-weight
    columns are ~1000x more active: the engine's Wanda masks are exactly the hand computation's, and
    the opposite of magnitude's (which a Wanda scoring |W| alone would reproduce)."""
    scale = torch.tensor([40.0, 60.0, 80.0, 100.0, 0.02, 0.04, 0.06, 0.08,  # designed: columns 0-3 active, 4-7 nearly silent
                          0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # mixed
    tokens = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(2))
    masks = {}
    for method in (Wanda(Wanda.Params(sparsity=0.5)), Magnitude(Magnitude.Params(sparsity=0.5))):
        model = _TinyModel(scale)
        layout = discover(model)
        assert [t.name for t in layout.targets] == ["layers.0.designed", "layers.0.mixed"]
        state = CompressionState()
        run_layerwise(model, layout, [PlannedStage(method, layout.targets)], state, list(tokens.split(8)), torch.device("cpu"))
        masks[method.name] = {t.name: state.mask(t.name) for t in layout.targets}
        for target in layout.targets:
            assert torch.equal(target.weight != 0, masks[method.name][target.name])

    model = _TinyModel(scale)  # the dense weights and the inputs they see, independent of compress's statistics
    with torch.no_grad():
        x = model.embed(tokens).reshape(-1, scale.numel()).double()
    for name, columns in (("designed", slice(0, 8)), ("mixed", slice(8, 16))):
        weight = getattr(model.layers[0], name).weight.detach().double()
        score = weight.abs() * x[:, columns].pow(2).sum(dim=0).sqrt()[None, :]
        expected = torch.ones_like(weight, dtype=torch.bool)
        for row in range(weight.shape[0]):
            expected[row, score[row].argsort()[: weight.shape[1] // 2]] = False  # the half of each row scoring lowest
        assert torch.equal(masks["wanda"][f"layers.0.{name}"], expected), f"{name}: Wanda's mask is not |W| * ||x_j||'s"
    designed = masks["wanda"]["layers.0.designed"]
    assert designed[:, :4].all() and not designed[:, 4:].any()  # the active, small-weight columns are kept
    assert torch.equal(masks["magnitude"]["layers.0.designed"], ~designed)  # magnitude drops exactly those


def test_hessian_of_half_precision_inputs_is_exact_in_tensor_cores():
    """On CUDA, X^T X of bf16 / fp16 inputs runs on TF32 tensor cores: exact products (the inputs keep all
    their bits in TF32), fp32 sums, so it equals the float64 result to fp32 rounding; the global matmul
    precision is left as it was. On CPU the fp32 path (the same assertion)."""
    from compress.calibration.statistics import Hessian

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = torch.backends.cuda.matmul.fp32_precision
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(4096, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
        hessian = Hessian(96, device)
        hessian.update(x.to(device))
        exact = x.double().T @ x.double()
        assert torch.allclose(hessian.value().double().cpu(), exact, rtol=0, atol=2e-6 * float(exact.abs().max()))
    assert torch.backends.cuda.matmul.fp32_precision == before
