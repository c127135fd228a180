"""The zoo's architectures: real `transformers` model classes built from their config classes
with small random weights (no downloads, no hub), each wrapped so that inputs are named tensors
and the output is one plain tensor.

Sizes avoid ambiguous dimensions (onnx2tf matches axes by size): text models use batch 1,
sequence 24 (the last 4 positions padded in `attention_mask`), hidden 64, 4 heads (head dim 16),
intermediate 128, vocab 1000, 64 positions; encoder-decoders add a decoder sequence of 12.
No weight dimension, hidden size or embedding size is 24 or 12. Images are 32x32 (ViT, DeiT,
Swin) or 64x64 (MobileViT, ConvNeXt), audio 2000 samples (Wav2Vec2, HuBERT) or 40 mel bins x 48
frames (Whisper encoder).

Weight regimes (``build(name, init=...)``):
  hf       the model's own initialisation (initializer_range 0.02 for most: attention near
           uniform);
  trained  "trained-like": every nn.Linear, nn.Conv1d/2d and nn.Embedding weight re-drawn from
           N(0, 0.2) and every bias from N(0, 0.05) (HF initialises biases to 0), so attention is
           peaked and bias errors are visible.

Every builder is seeded (torch.manual_seed(0) before construction, seed 1 for inputs): the same
name and init always give the same weights and inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

BATCH = 1
SEQ = 24
PAD = 4            # trailing padded positions in attention_mask
DEC_SEQ = 12
VOCAB = 1000
HIDDEN = 64
HEADS = 4
FFN = 128
LAYERS = 2
POSITIONS = 64
LABELS = 3
IMAGE = 32
AUDIO_SAMPLES = 2000
MEL_BINS = 40
MEL_FRAMES = 48    # Whisper: 2 x max_source_positions (24)


@dataclass
class ZooModel:
    name: str
    family: str                     # text-encoder | classifier | decoder | encoder-decoder | vision | speech
    hf_class: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # ordered as forward's arguments
    output_name: str
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    notes: str = ""

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.inputs.values())

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)


# --- wrappers: named tensor inputs, one plain tensor out ------------------------------------

class TextWrap(nn.Module):
    """input_ids, attention_mask -> last_hidden_state (or logits with out='logits')."""

    def __init__(self, model: nn.Module, out: str = "last_hidden_state") -> None:
        super().__init__()
        self.model, self.out = model, out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.out)


class DecoderWrap(nn.Module):
    """input_ids, attention_mask -> logits; a single forward, no KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits


class Seq2SeqWrap(nn.Module):
    """input_ids, attention_mask, decoder_input_ids -> logits; one forward, no cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, use_cache=False).logits


class SentenceWrap(nn.Module):
    """sentence-transformers style: BERT, mean pooling over the mask (clamp(min=1e-9)), L2
    normalisation -> embeddings [batch, hidden]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(1)
        counts = torch.clamp(mask.sum(1), min=1e-9)
        return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


class PixelWrap(nn.Module):
    def __init__(self, model: nn.Module, out: str) -> None:
        super().__init__()
        self.model, self.out = model, out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values), self.out)


class AudioWrap(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.model(input_values=input_values).last_hidden_state


class WhisperEncoderWrap(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features).last_hidden_state


# --- inputs -------------------------------------------------------------------------------

def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def text_inputs(vocab: int = VOCAB, low: int = 3) -> dict[str, torch.Tensor]:
    g = _gen()
    ids = torch.randint(low, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[:, SEQ - PAD:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def seq2seq_inputs(pad_id: int = 0) -> dict[str, torch.Tensor]:
    feeds = text_inputs()
    feeds["input_ids"] = feeds["input_ids"].masked_fill(feeds["attention_mask"] == 0, pad_id)
    g = torch.Generator().manual_seed(2)
    dec = torch.randint(3, VOCAB, (BATCH, DEC_SEQ), generator=g)
    dec[:, 0] = pad_id  # decoder start token (= pad for T5/BART-style/Marian configs here)
    feeds["decoder_input_ids"] = dec
    return feeds


def pixel_inputs(size: int = IMAGE) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=_gen())}


def audio_inputs() -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=_gen())}


def mel_inputs() -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(BATCH, MEL_BINS, MEL_FRAMES, generator=_gen())}


TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"},
             "attention_mask": {0: "batch", 1: "sequence"}}
SEQ2SEQ_AXES = TEXT_AXES | {"decoder_input_ids": {0: "batch", 1: "decoder_sequence"}}


# --- architectures ------------------------------------------------------------------------

def _bert_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=FFN,
                max_position_embeddings=POSITIONS) | extra


def _tr():
    import transformers
    return transformers


def bert():
    tr = _tr()
    m = tr.BertModel(tr.BertConfig(**_bert_like()))
    return "text-encoder", "BertModel", TextWrap(m), text_inputs(), "last_hidden_state", TEXT_AXES


def distilbert():
    tr = _tr()
    m = tr.DistilBertModel(tr.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                               n_heads=HEADS, hidden_dim=FFN,
                                               max_position_embeddings=POSITIONS))
    return ("text-encoder", "DistilBertModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def roberta():
    tr = _tr()
    m = tr.RobertaModel(tr.RobertaConfig(**_bert_like(pad_token_id=1)))
    return ("text-encoder", "RobertaModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def albert():
    tr = _tr()
    m = tr.AlbertModel(tr.AlbertConfig(**_bert_like(embedding_size=32)))
    return ("text-encoder", "AlbertModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def electra():
    tr = _tr()
    m = tr.ElectraModel(tr.ElectraConfig(**_bert_like(embedding_size=32)))
    return ("text-encoder", "ElectraModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def deberta_v2():
    tr = _tr()
    cfg = tr.DebertaV2Config(**_bert_like(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                          position_biased_input=False, max_relative_positions=-1,
                                          position_buckets=32, norm_rel_ebd="layer_norm",
                                          share_att_key=True))
    m = tr.DebertaV2Model(cfg)
    return ("text-encoder", "DebertaV2Model (v3-style relative attention)", TextWrap(m),
            text_inputs(), "last_hidden_state", TEXT_AXES)


def mpnet():
    tr = _tr()
    m = tr.MPNetModel(tr.MPNetConfig(**_bert_like(pad_token_id=1)))
    return ("text-encoder", "MPNetModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def xlm_roberta():
    tr = _tr()
    m = tr.XLMRobertaModel(tr.XLMRobertaConfig(**_bert_like(pad_token_id=1)))
    return ("text-encoder", "XLMRobertaModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def roformer():
    tr = _tr()
    m = tr.RoFormerModel(tr.RoFormerConfig(**_bert_like(embedding_size=HIDDEN)))
    return ("text-encoder", "RoFormerModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def modernbert():
    tr = _tr()
    cfg = tr.ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              max_position_embeddings=POSITIONS, global_attn_every_n_layers=2,
                              local_attention=16, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, cls_token_id=1, sep_token_id=2)
    m = tr.ModernBertModel(cfg)
    return ("text-encoder", "ModernBertModel", TextWrap(m), text_inputs(), "last_hidden_state",
            TEXT_AXES)


def st_bert():
    tr = _tr()
    m = tr.BertModel(tr.BertConfig(**_bert_like()), add_pooling_layer=False)
    return ("text-encoder", "BertModel + mean pooling + L2 normalize (sentence-transformers)",
            SentenceWrap(m), text_inputs(), "embeddings", TEXT_AXES)


def distilbert_cls():
    tr = _tr()
    cfg = tr.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                              hidden_dim=FFN, max_position_embeddings=POSITIONS, num_labels=LABELS)
    m = tr.DistilBertForSequenceClassification(cfg)
    return ("classifier", "DistilBertForSequenceClassification", TextWrap(m, "logits"),
            text_inputs(), "logits", TEXT_AXES)


def electra_cls():
    tr = _tr()
    m = tr.ElectraForSequenceClassification(
        tr.ElectraConfig(**_bert_like(embedding_size=32, num_labels=LABELS)))
    return ("classifier", "ElectraForSequenceClassification", TextWrap(m, "logits"),
            text_inputs(), "logits", TEXT_AXES)


def roberta_tokcls():
    tr = _tr()
    m = tr.RobertaForTokenClassification(tr.RobertaConfig(**_bert_like(pad_token_id=1,
                                                                        num_labels=5)))
    return ("classifier", "RobertaForTokenClassification", TextWrap(m, "logits"),
            text_inputs(), "logits", TEXT_AXES)


def gpt2():
    tr = _tr()
    m = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN,
                                         n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                         bos_token_id=2, eos_token_id=2, use_cache=False))
    return "decoder", "GPT2LMHeadModel", DecoderWrap(m), text_inputs(), "logits", TEXT_AXES


def _llama_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                max_position_embeddings=POSITIONS, use_cache=False, pad_token_id=0,
                bos_token_id=1, eos_token_id=2) | extra


def llama():
    tr = _tr()
    m = tr.LlamaForCausalLM(tr.LlamaConfig(**_llama_like()))
    return ("decoder", "LlamaForCausalLM (GQA 4/2 heads)", DecoderWrap(m), text_inputs(),
            "logits", TEXT_AXES)


def qwen2():
    tr = _tr()
    m = tr.Qwen2ForCausalLM(tr.Qwen2Config(**_llama_like()))
    return ("decoder", "Qwen2ForCausalLM (GQA, qkv bias)", DecoderWrap(m), text_inputs(),
            "logits", TEXT_AXES)


def mistral():
    tr = _tr()
    m = tr.MistralForCausalLM(tr.MistralConfig(**_llama_like(sliding_window=16)))
    return ("decoder", "MistralForCausalLM (GQA, sliding window 16)", DecoderWrap(m),
            text_inputs(), "logits", TEXT_AXES)


def phi():
    tr = _tr()
    m = tr.PhiForCausalLM(tr.PhiConfig(**_llama_like(num_key_value_heads=HEADS,
                                                     partial_rotary_factor=0.5)))
    return ("decoder", "PhiForCausalLM (partial rotary 0.5)", DecoderWrap(m), text_inputs(),
            "logits", TEXT_AXES)


def opt():
    tr = _tr()
    m = tr.OPTForCausalLM(tr.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       max_position_embeddings=POSITIONS,
                                       word_embed_proj_dim=HIDDEN, use_cache=False,
                                       pad_token_id=1, bos_token_id=2, eos_token_id=2))
    return "decoder", "OPTForCausalLM", DecoderWrap(m), text_inputs(), "logits", TEXT_AXES


def t5():
    tr = _tr()
    cfg = tr.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=LAYERS,
                      num_decoder_layers=LAYERS, num_heads=HEADS, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0, use_cache=False)
    m = tr.T5ForConditionalGeneration(cfg)
    return ("encoder-decoder", "T5ForConditionalGeneration", Seq2SeqWrap(m), seq2seq_inputs(0),
            "logits", SEQ2SEQ_AXES)


def _bart_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=POSITIONS,
                use_cache=False) | extra


def bart():
    tr = _tr()
    cfg = tr.BartConfig(**_bart_like(pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     decoder_start_token_id=2))
    m = tr.BartForConditionalGeneration(cfg)
    return ("encoder-decoder", "BartForConditionalGeneration", Seq2SeqWrap(m),
            seq2seq_inputs(1), "logits", SEQ2SEQ_AXES)


def marian():
    tr = _tr()
    cfg = tr.MarianConfig(**_bart_like(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                       decoder_vocab_size=VOCAB))
    m = tr.MarianMTModel(cfg)
    return ("encoder-decoder", "MarianMTModel (sinusoidal positions)", Seq2SeqWrap(m),
            seq2seq_inputs(0), "logits", SEQ2SEQ_AXES)


def _vit_like(**extra) -> dict:
    return dict(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN) | extra


def vit():
    tr = _tr()
    m = tr.ViTModel(tr.ViTConfig(**_vit_like()), add_pooling_layer=False)
    return "vision", "ViTModel", PixelWrap(m, "last_hidden_state"), pixel_inputs(), \
        "last_hidden_state", {}


def deit():
    tr = _tr()
    m = tr.DeiTForImageClassification(tr.DeiTConfig(**_vit_like(num_labels=10)))
    return "vision", "DeiTForImageClassification", PixelWrap(m, "logits"), pixel_inputs(), \
        "logits", {}


def swin():
    tr = _tr()
    cfg = tr.SwinConfig(image_size=IMAGE, patch_size=2, num_channels=3, embed_dim=48,
                        depths=[2, 2], num_heads=[2, 4], window_size=4, mlp_ratio=2.0,
                        num_labels=10)
    m = tr.SwinForImageClassification(cfg)
    return ("vision", "SwinForImageClassification (window 4, shifted windows)",
            PixelWrap(m, "logits"), pixel_inputs(), "logits", {})


def mobilevit():
    tr = _tr()
    cfg = tr.MobileViTConfig(image_size=64, patch_size=2, num_channels=3,
                             hidden_sizes=[40, 48, 56], neck_hidden_sizes=[8, 16, 24, 40, 48, 56, 96],
                             num_attention_heads=4, expand_ratio=2.0, num_labels=10,
                             initializer_range=0.3)
    m = tr.MobileViTForImageClassification(cfg)
    # initializer_range 0.3 (default 0.02): with 0.02 the bias-free convs shrink the activations
    # to exactly 0 by the last stage (logits all 0; 0.1 gives 1e-4), nothing to compare
    return ("vision", "MobileViTForImageClassification (conv + transformer hybrid)",
            PixelWrap(m, "logits"), pixel_inputs(64), "logits", {})


def convnext():
    tr = _tr()
    cfg = tr.ConvNextConfig(num_channels=3, hidden_sizes=[16, 40, 56, 80], depths=[1, 1, 2, 1],
                            num_labels=10)
    m = tr.ConvNextForImageClassification(cfg)
    return "vision", "ConvNextForImageClassification", PixelWrap(m, "logits"), \
        pixel_inputs(64), "logits", {}


def _w2v_like(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=FFN, conv_dim=(40, 40, 40),
                conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4, mask_time_prob=0.0) | extra


def wav2vec2():
    tr = _tr()
    m = tr.Wav2Vec2Model(tr.Wav2Vec2Config(**_w2v_like()))
    return ("speech", "Wav2Vec2Model (conv feature encoder, group norm)", AudioWrap(m),
            audio_inputs(), "last_hidden_state", {})


def hubert():
    tr = _tr()
    m = tr.HubertModel(tr.HubertConfig(**_w2v_like()))
    return "speech", "HubertModel", AudioWrap(m), audio_inputs(), "last_hidden_state", {}


def whisper_encoder():
    tr = _tr()
    cfg = tr.WhisperConfig(vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=HIDDEN,
                           encoder_layers=LAYERS, decoder_layers=LAYERS,
                           encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                           encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                           max_source_positions=MEL_FRAMES // 2, max_target_positions=POSITIONS,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1, use_cache=False)
    m = tr.WhisperModel(cfg).get_encoder()
    return ("speech", "WhisperModel encoder (log-mel input features)", WhisperEncoderWrap(m),
            mel_inputs(), "last_hidden_state", {})


ARCHITECTURES: dict[str, Callable] = {f.__name__: f for f in (
    bert, distilbert, roberta, albert, electra, deberta_v2, mpnet, xlm_roberta, roformer,
    modernbert, st_bert, distilbert_cls, electra_cls, roberta_tokcls,
    gpt2, llama, qwen2, mistral, phi, opt,
    t5, bart, marian,
    vit, deit, swin, mobilevit, convnext,
    wav2vec2, hubert, whisper_encoder)}


def _trained_like(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)):
                w = sub.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
                if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                    w[sub.padding_idx].zero_()
                bias = getattr(sub, "bias", None)
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=g) * 0.05)


def build(name: str, init: str = "hf") -> ZooModel:
    """One architecture in eval mode, with its example inputs. init: 'hf' or 'trained'."""
    if init not in ("hf", "trained"):
        raise ValueError(f"init must be 'hf' or 'trained', not {init!r}")
    torch.manual_seed(0)
    family, hf_class, module, inputs, out, axes = ARCHITECTURES[name]()
    if init == "trained":
        _trained_like(module)
    module.eval()
    inner = getattr(module, "model", None) or getattr(module, "encoder", None)
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    notes = f"attn_implementation={attn}" if attn else ""
    return ZooModel(name, family, hf_class, module, inputs, out, dict(axes), notes)
