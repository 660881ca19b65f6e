"""Hooks find layers generically and detach cleanly."""
import pytest
import torch

from rcd.hooks import HiddenCapture, KeyEncoder, find_decoder_layers


def tiny(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=2)
        return tf.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=64))
    if kind == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, ffn_dim=32,
                                              num_attention_heads=2, word_embed_proj_dim=16,
                                              max_position_embeddings=64))
    if kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=2)
        return tf.Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "qwen2"])
def test_layers_found_and_capture_detaches(kind):
    model = tiny(kind).eval()
    assert len(find_decoder_layers(model)) == 3
    ids = torch.arange(1, 9).view(1, -1)
    head = model.get_output_embeddings()
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)  # transformers installs its own hooks lazily here
    before = [len(b._forward_hooks) for b in find_decoder_layers(model)]
    with HiddenCapture(model, "final") as cap:
        with torch.no_grad():
            out = model(ids)
        final = cap.hidden
    assert len(head._forward_pre_hooks) == 0 and cap.hidden is None
    # the captured state is what the head turns into the logits
    assert torch.allclose(head(final), out.logits, atol=1e-5)
    with HiddenCapture(model, 1) as cap:
        with torch.no_grad():
            model(ids)
        mid = cap.hidden
    assert torch.allclose(mid, ref.hidden_states[2], atol=1e-5)  # hidden_states[0] = embeddings
    assert [len(b._forward_hooks) for b in find_decoder_layers(model)] == before
    enc = KeyEncoder(model, "final")
    assert torch.allclose(enc(ids), final, atol=1e-5)


def test_bad_layer_is_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="out of range"):
        HiddenCapture(model, 7)
    with pytest.raises(ValueError, match="'final' or an integer"):
        HiddenCapture(model, "middle")
