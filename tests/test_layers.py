import torch

from tbdiag.io.checkpoint import open_checkpoint
from tbdiag.esd.layers import kind_from_name, layer_name, plan_layers


def test_kind_from_name_and_shape():
    assert kind_from_name("fc.weight", (10, 20)) == "linear"
    assert kind_from_name("layer1.0.conv1.weight", (64, 64, 3, 3)) == "conv2d"
    assert kind_from_name("tcn.weight", (8, 4, 5)) == "conv1d"
    assert kind_from_name("c3d.weight", (8, 4, 3, 3, 3)) == "conv3d"
    assert kind_from_name("lstm.weight_hh_l0", (48, 12)) == "rnn"
    assert kind_from_name("lstm.weight_ih_l1_reverse", (48, 12)) == "rnn"
    assert kind_from_name("bert.embeddings.word_embeddings.weight", (30522, 384)) == "embedding"
    assert kind_from_name("transformer.wte.weight", (50257, 768)) == "embedding"
    assert kind_from_name("attn.in_proj_weight", (96, 32)) == "linear"
    for name, shape in [("fc.bias", (10,)), ("bn.running_mean", (16,)), ("pos_embed", (1, 197, 768)),
                        ("q.weight_scale_inv", (32, 32)), ("cls_token", (1, 1, 768))]:
        assert kind_from_name(name, shape) is None, name


def test_layer_name_strips_trailing_weight_only():
    assert layer_name("layer1.0.conv1.weight") == "layer1.0.conv1"
    assert layer_name("lstm.weight_hh_l0") == "lstm.weight_hh_l0"


def test_plan_from_module_types(tiny):
    layers, skipped = plan_layers(open_checkpoint(tiny))
    kinds = {l.name: l.kind for l in layers}
    assert kinds == {"conv": "conv2d", "conv1d": "conv1d", "rnn.weight_ih_l0": "rnn", "rnn.weight_hh_l0": "rnn",
                     "fc1": "linear", "fc2": "linear"}
    assert skipped["embedding"] == 1
    conv = next(l for l in layers if l.name == "conv")
    assert conv.n_matrices == 9 and conv.n_evals == 27


def test_embeddings_on_request_and_patterns(tiny):
    ckpt = open_checkpoint(tiny)
    names = [l.name for l in plan_layers(ckpt, include_embeddings=True)[0]]
    assert names[0] == "emb"
    only_fc = [l.name for l in plan_layers(ckpt, include=("fc*",))[0]]
    assert only_fc == ["fc1", "fc2"]
    no_rnn, skipped = plan_layers(ckpt, exclude=("rnn.*",))
    assert all(not l.name.startswith("rnn") for l in no_rnn) and skipped["excluded"] == 2


def test_depthwise_and_tied_weights():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(30, 8)
            self.head = torch.nn.Linear(8, 30, bias=False)
            self.head.weight = self.embed.weight
            self.dw = torch.nn.Conv2d(8, 8, 3, groups=8)

    layers, _ = plan_layers(open_checkpoint(Tied()), include_embeddings=True)
    assert [l.name for l in layers] == ["embed", "dw"]  # the tied head is the embedding, analysed once
    assert layers[1].n_evals == 9
