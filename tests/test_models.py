"""ctrflow.models: shapes, gradients, DLRM's interaction against a hand-computed reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ctrflow.etl.schema import ColumnSchema, Schema
from ctrflow.models import (
    DLRM,
    EmbeddingPart,
    EmbeddingTables,
    FusedEmbedding,
    InteractionArch,
    SparseArch,
    TabularModel,
    build_embedding,
)
from ctrflow.models.embedding_part import flatten_slots, stack_slots
from ctrflow.models.mlp import mlp

CARDS = [7, 3, 50, 11]


def _batch(b: int = 6, cards=CARDS, n_cont: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Column-major ids, as the loader yields them.
    cat = torch.stack([torch.randint(0, c, (b,), generator=g) for c in cards]).to(torch.int32).t()
    return cat, torch.randn(b, n_cont, generator=g)


def _schema(cards=CARDS, n_cont: int = 5, dims=None) -> Schema:
    cols = [ColumnSchema(f"C{i}", "categorical", "int32", cardinality=c, embedding_dim=(dims or [16] * len(cards))[i])
            for i, c in enumerate(cards)]
    cols += [ColumnSchema(f"I{i}", "continuous", "float32") for i in range(n_cont)]
    return Schema([*cols, ColumnSchema("label", "label", "float32")])


def test_fused_embedding_matches_separate_tables():
    emb = FusedEmbedding(CARDS, 4, init="uniform")
    cat, _ = _batch()
    out = emb(cat)
    assert out.shape == (6, 4, 4)
    starts = [0, *itertools.accumulate(CARDS)][:-1]
    for i, (s, c) in enumerate(zip(starts, CARDS, strict=True)):
        table = emb.weight[s : s + c]
        assert torch.equal(out[:, i], table[cat[:, i].long()])
        bound = (1.0 / c) ** 0.5
        assert table.abs().max() <= bound


def test_fused_embedding_gradient_is_sparse_and_row_exact():
    emb = FusedEmbedding(CARDS, 3)
    cat, _ = _batch()
    emb(cat).sum().backward()
    g = emb.weight.grad
    assert g.is_sparse
    dense = g.to_dense()
    ref = torch.zeros_like(dense)
    offs = torch.tensor([0, *itertools.accumulate(CARDS)][:-1])
    ref.index_add_(0, (cat.long() + offs).reshape(-1), torch.ones(cat.numel(), 3))
    assert torch.equal(dense, ref)


def test_embedding_rejects_bad_ids_and_shapes():
    emb = FusedEmbedding(CARDS, 2)
    cat, _ = _batch()
    bad = cat.clone()
    bad[0, 2] = 50  # table 2 has 50 rows: id 50 would read table 3's first row
    with pytest.raises(ValueError, match="categorical feature 2: ids span"):
        emb.check_ids(bad)
    with pytest.raises(ValueError, match=r"shape \[B, 4\]"):
        emb(cat[:, :3])
    with pytest.raises(ValueError, match="cardinality must be >= 1"):
        FusedEmbedding([3, 0], 2)


def test_embedding_tables_mixed_dims():
    emb = EmbeddingTables([(7, 2), (3, 4), (50, 2)])
    cat, _ = _batch(cards=[7, 3, 50])
    blocks = emb(cat)  # one block per dim, ascending: dim 2 (features 0, 2), dim 4 (feature 1)
    assert [tuple(b.shape) for b in blocks] == [(6, 2, 2), (6, 1, 4)]
    assert torch.equal(blocks[0][:, 1], emb.groups[0](cat[:, [0, 2]])[:, 1])
    assert len(emb.groups) == 2 and emb.out_features == 8 and emb.num_slots == 3 and emb.dims == [2, 4]


@pytest.mark.parametrize("out_sz", [1, 2])
def test_tabular_shapes_and_gradients(out_sz):
    torch.manual_seed(0)
    m = TabularModel([(c, 3) for c in CARDS], n_cont=5, out_sz=out_sz, layers=[8, 4], ps=0.1, embed_p=0.1)
    cat, cont = _batch()
    out = m(cat, cont)
    assert out.shape == (6, out_sz)
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    assert m.embeds.groups[0].weight.grad.is_sparse


def test_one_embedding_part_interface():
    cat, _ = _batch()
    one = build_embedding([(c, 4) for c in CARDS], one_dim=True, init="uniform")
    mixed = build_embedding([(c, d) for c, d in zip(CARDS, [2, 4, 2, 3], strict=True)])
    assert type(one) is SparseArch and type(mixed) is EmbeddingTables
    for part, dims in ((one, [4]), (mixed, [2, 3, 4])):
        assert isinstance(part, EmbeddingPart) and part.dims == dims and not part.list_features
        blocks = part(cat)
        assert sum(b.shape[1] for b in blocks) == part.num_slots == part.num_columns == 4
        assert flatten_slots(blocks).shape == (6, part.out_features)
        part.check_input(cat)
        with pytest.raises(ValueError, match="categorical feature 2: ids span"):
            part.check_input(cat + torch.tensor([0, 0, 50, 0], dtype=torch.int32))
    assert stack_slots(one(cat)).shape == (6, 4, 4) and one.out_features == 16
    with pytest.raises(ValueError, match=r"dims \[2, 4\]"):
        build_embedding([(7, 2), (3, 4)], one_dim=True)
    none = build_embedding([])  # a tabular model of continuous inputs only
    assert none.num_slots == none.out_features == 0
    none.check_input(None)
    with pytest.raises(ValueError, match="2 categorical columns, the model 0"):
        none.check_input(cat[:, :2])
    dlrm, tab = DLRM(CARDS, 5, 4, [4], [1]), TabularModel([(7, 2), (3, 4)], 0, 1, [8])
    assert dlrm.embedding_part is dlrm.sparse_arch and tab.embedding_part is tab.embeds
    only_cont = TabularModel([], 3, 1, [8])
    assert only_cont(None, torch.randn(2, 3)).shape == (2, 1) and "embeds.groups.0.weight" not in only_cont.state_dict()


def test_mlp_dropout_after_hidden_layers_only():
    kinds = [type(x).__name__ for x in mlp(4, [8, 8, 2], last_activation=False, dropout=0.1)]
    assert kinds == ["Linear", "Sequential", "Linear", "Sequential", "Linear"]
    assert [type(x).__name__ for x in mlp(4, [8, 2], last_activation=True, dropout=0.1)] == [
        "Linear", "Sequential", "Linear", "ReLU"]  # a bottom MLP's output: no dropout
    assert [type(x).__name__ for x in mlp(4, [8, 2], dropout=0.1, last_dropout=True)][-1] == "Sequential"
    assert not any(isinstance(x, nn.Dropout) for x in mlp(4, [8, 8, 2], dropout=0.0).modules())
    with pytest.raises(ValueError, match="dropout must be in"):
        mlp(4, [2], dropout=1.5)


def test_dlrm_dropout_keeps_checkpoints_and_config():
    torch.manual_seed(0)
    plain = DLRM(CARDS, 5, 4, [8, 8, 4], [8, 8, 1])
    assert "dropout" not in plain.config and not any(isinstance(x, nn.Dropout) for x in plain.modules())
    drop = DLRM(CARDS, 5, 4, [8, 8, 4], [8, 8, 1], dropout=0.5)
    assert drop.config["dropout"] == 0.5
    for arch in (drop.dense_arch, drop.over_arch):  # after the 2 hidden layers, not after the last
        assert sum(isinstance(x, nn.Dropout) for x in arch.modules()) == 2
    assert [(k, v.shape) for k, v in drop.state_dict().items()] == [(k, v.shape) for k, v in plain.state_dict().items()]
    drop.load_state_dict(plain.state_dict())
    cat, cont = _batch()
    torch.testing.assert_close(drop.eval()(cat, cont), plain.eval()(cat, cont))  # eval: dropout off
    drop.train()
    assert not torch.equal(drop(cat, cont), drop(cat, cont))
    assert DLRM(**drop.config).config == drop.config
    schema = _schema()
    assert DLRM.from_options(schema, dropout=0.3).config["dropout"] == 0.3
    assert "dropout" not in DLRM.from_options(schema).config
    assert TabularModel.from_options(schema, layers=[8, 4], dropout=0.2).config["ps"] == [0.2, 0.2]
    assert TabularModel.from_options(schema, layers=[8, 4]).config["ps"] == [0.0, 0.0]


def test_tabular_is_fastai_architecture():
    m = TabularModel([(10, 4), (5, 2)], n_cont=3, out_sz=2, layers=[16, 8], ps=[0.2, 0.1])
    kinds = [type(x).__name__ for x in m.layers]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert m.layers[0].in_features == 4 + 2 + 3 and m.layers[0].bias is None  # bias off before BatchNorm
    assert m.layers[-1].out_features == 2 and m.layers[-1].bias is not None
    assert isinstance(m.bn_cont, nn.BatchNorm1d)
    no_bn = TabularModel([(10, 4)], n_cont=0, out_sz=1, layers=[8], use_bn=False)
    assert [type(x).__name__ for x in no_bn.layers] == ["Linear", "ReLU", "Linear"]
    assert no_bn(torch.randint(0, 10, (3, 1))).shape == (3, 1)


def test_dlrm_shapes_and_gradients():
    torch.manual_seed(0)
    m = DLRM(CARDS, n_cont=5, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    cat, cont = _batch()
    out = m(cat, cont)
    assert out.shape == (6, 1)
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    assert m.over_arch.model[0].in_features == 4 + 4 * 5 // 2


def test_interaction_matches_hand_computed_reference():
    b, f, d = 3, 3, 2
    dense = torch.arange(b * d, dtype=torch.float32).reshape(b, d) / 10
    sparse = torch.arange(b * f * d, dtype=torch.float32).reshape(b, f, d) / 7 - 1
    out = InteractionArch(f)(dense, sparse)
    assert out.shape == (b, d + f * (f + 1) // 2)
    for r in range(b):
        vecs = [dense[r]] + [sparse[r, i] for i in range(f)]
        # Pairs (i < j) in row-major upper-triangle order: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3).
        dots = [float(vecs[i] @ vecs[j]) for i in range(f + 1) for j in range(i + 1, f + 1)]
        expect = torch.tensor([*dense[r].tolist(), *dots])
        torch.testing.assert_close(out[r], expect)


def test_interaction_gradient_matches_autograd_reference():
    torch.manual_seed(0)
    dense = torch.randn(4, 3, requires_grad=True)
    sparse = torch.randn(4, 5, 3, requires_grad=True)
    InteractionArch(5)(dense, sparse).pow(2).sum().backward()
    d2, s2 = dense.detach().clone().requires_grad_(), sparse.detach().clone().requires_grad_()
    comb = torch.cat([d2.unsqueeze(1), s2], 1)
    gram = comb @ comb.transpose(1, 2)
    i, j = torch.triu_indices(6, 6, 1)
    torch.cat([d2, gram[:, i, j]], 1).pow(2).sum().backward()
    torch.testing.assert_close(dense.grad, d2.grad)
    torch.testing.assert_close(sparse.grad, s2.grad)


def test_dlrm_config_errors_quote_numbers():
    with pytest.raises(ValueError, match="embedding_dim=8"):
        DLRM(CARDS, 5, embedding_dim=8, dense_arch_layer_sizes=[16, 4])
    with pytest.raises(ValueError, match="n_cont=0"):
        DLRM(CARDS, 0, embedding_dim=4, dense_arch_layer_sizes=[4])


def test_from_schema_sizes_and_cap(tmp_path):
    schema = _schema(dims=[16, 32, 64, 16])
    tab = TabularModel.from_schema(schema, layers=[8], max_dim=16)
    assert tab.embeds.emb_szs == [(c, 16) for c in CARDS]
    full = TabularModel.from_schema(schema, layers=[8], max_dim=None)
    assert [d for _, d in full.embeds.emb_szs] == [16, 32, 64, 16]
    schema.save(tmp_path / "schema.json")
    dlrm = DLRM.from_schema(tmp_path, embedding_dim=8, over_arch_layer_sizes=[4, 1])
    assert dlrm.config["cardinalities"] == CARDS and dlrm.n_cont == 5
    assert dlrm.config["dense_arch_layer_sizes"] == [512, 256, 8]
    cat, cont = _batch()
    assert dlrm(cat, cont).shape == (6, 1)
    with pytest.raises(ValueError, match="continuous columns"):
        dlrm.check_input(cat, cont[:, :4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_on_gpu_with_bf16_autocast():
    cat, cont = _batch()
    from ctrflow.models import DCNv2

    for m in (DLRM(CARDS, 5, 4, [8, 4], [8, 1], dropout=0.1), TabularModel([(c, 3) for c in CARDS], 5, 1, [8]),
              DCNv2([(c, 3) for c in CARDS], 5, deep_layers=[8]), DCNv2([(c, 3) for c in CARDS], 5, rank=2)):
        m = m.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(cat.cuda(), cont.cuda())
        out.float().sum().backward()
        assert out.shape == (6, 1) and all(p.grad is not None for p in m.parameters())


def test_every_registered_model_implements_the_protocol(tmp_path):
    # The written contract (ctrflow.models.protocol): what fit.py, the trainer and the server rely on.
    from ctrflow.models.protocol import MODELS, CTRModel

    cols = [ColumnSchema(f"C{i}", "categorical", "int32", cardinality=c, embedding_dim=8)
            for i, c in enumerate([7, 11])]
    cols += [ColumnSchema("I0", "continuous", "float32"), ColumnSchema("label", "label", "float32")]
    schema = Schema(cols, {})
    cat, cont = torch.tensor([[3, 4], [6, 10]]), torch.randn(2, 1)
    for name, cls in MODELS.items():
        model = cls.from_options(schema, layers=[8], bottom_layers=[4], embedding_dim=4)
        assert isinstance(model, CTRModel), name
        assert model(cat, cont).shape == (2, 1) and model.takes_lists is False
        model.check_input(cat, cont)
        with pytest.raises(ValueError):
            model.check_input(cat + 100, cont)
        rebuilt = type(model)(**model.config)  # a checkpoint's config rebuilds the same architecture
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
