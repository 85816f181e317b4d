"""The foundation encoders dermfusion claims, described here *in their upstream parameter names*, with a plain forward.

Written for this project from the upstream model definitions (read, not copied: see ``PROVENANCE``). Two uses:

* ``tools/foundation_keysets.py`` builds each one at full size on the ``meta`` device and writes its state-dict key
  set with shapes to ``src/dermfusion/models/upstream_keys/<name>.json`` (what ``dermfusion weights check`` compares
  a downloaded file with);
* the tests build reduced-width variants with real tensors, save their state dicts as a "published" checkpoint and
  compare dermfusion's loader + forward pass with the forward written here — an implementation independent of
  dermfusion's key mapping and of timm / open_clip.

Nothing here is imported by the package.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The upstream commits read for these facts (repository → commit).
COMMITS = {
    "SiyuanYan1/PanDerm": "97e09d066c61b7d7cb3044a7318f66d8f308a017",
    "SiyuanYan1/Derm1M": "92d8fa9d9775aaf65bf3150c998d32daf4f1d32f",
    "SiyuanYan1/DermFM-Zero": "afbe6ba22e57037cd7418681c2d90561049afde6",
    "suinleelab/MONET": "3ae0a64dcc96a6fa23c191f85d85325181caf1dd",
}


def _src(repo: str, path: str, fact: str) -> dict:
    return {"repository": repo, "path": path, "commit": COMMITS[repo], "fact": fact}


LN6 = 1e-6


# --------------------------------------------------------------------------------------- PanDerm / CAE encoder
class CaeAttention(nn.Module):
    """qkv weight without bias, separate q and v biases (k has none), scale head_dim ** -0.5."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = ((q * (D // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, D))


class CaeMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU


class CaeBlock(nn.Module):
    """x + γ1·Attn(LN(x)); x + γ2·MLP(LN(x)) — LayerNorm eps 1e-6, layer scale ``gamma_1`` / ``gamma_2``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN6)
        self.attn = CaeAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN6)
        self.mlp = CaeMlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(0.1 * torch.ones(dim))
        self.gamma_2 = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class CaeViT(nn.Module):
    """PanDerm's encoder (CAE/BEiT-style ViT): patch embedding, class token, absolute position embedding (a 2-D sin-cos
    table stored as a parameter, CLS slot zero), blocks, final LayerNorm; optionally a linear ``head`` with bias.

    ``pool``: ``"cls"`` — the class token after the final norm (PanDerm's linear-probe / feature-extraction forward);
    ``"mean_double_norm"`` — the Derm1M / DermFM-Zero image tower: the final norm over all tokens, the mean of the
    patch tokens, then the *same* norm again, then the head."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 16, img: int = 224, head_dim: int = 0,
                 pool: str = "cls"):
        super().__init__()
        self.patch, self.pool = patch, pool
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList([CaeBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN6)
        if head_dim:
            self.head = nn.Linear(dim, head_dim)

    def tokens(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        t = self.tokens(x)
        pooled = t[:, 0] if self.pool == "cls" else self.norm(t[:, 1:].mean(1))
        return self.head(pooled) if hasattr(self, "head") else pooled


# ------------------------------------------------------------------------------------ CAE-v2 pre-training model
class CaeCrossAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)


class CaeRegressorBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v, self.norm2_cross = (nn.LayerNorm(dim, eps=LN6) for _ in range(4))
        self.cross_attn = CaeCrossAttention(dim)
        self.mlp_cross = CaeMlp(dim, 4 * dim)
        self.gamma_1_cross = nn.Parameter(torch.ones(dim))
        self.gamma_2_cross = nn.Parameter(torch.ones(dim))


class CaeV2Pretraining(nn.Module):
    """The CAE-v2 pre-training model's parameters (``model_type='caev2'``): the encoder, the latent regressor
    (``regresser``, upstream's spelling) with its own position table, the mask token and a depth-0 decoder (norm +
    head to 512, the CLIP-target width). No alignment encoder in CAE-v2; ``encoder_to_regresser`` only when the
    regressor is narrower than the encoder. Only the encoder has a forward here (it is all dermfusion uses)."""

    def __init__(self, dim: int, depth: int, heads: int, regressor_depth: int = 4, decoder_dim: int | None = None,
                 out_dim: int = 512, patch: int = 16, img: int = 224):
        super().__init__()
        dd = decoder_dim or dim
        self.encoder = CaeViT(dim, depth, heads, patch, img)
        if dd != dim:
            self.encoder_to_regresser = nn.Linear(dim, dd)
            self.encoder_to_regresser_norm = nn.LayerNorm(dd, eps=LN6)
        self.rd_pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dd))
        self.regresser = nn.Module()
        self.regresser.regressor_blocks = nn.ModuleList([CaeRegressorBlock(dd) for _ in range(regressor_depth)])
        self.regresser.norm = nn.LayerNorm(dd, eps=LN6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder = nn.Module()
        self.decoder.norm = nn.LayerNorm(dd, eps=LN6)
        self.decoder.head = nn.Linear(dd, out_dim)

    def forward(self, x):
        return self.encoder(x)


# ------------------------------------------------------------------------------------------------ OpenAI CLIP
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipBlock(nn.Module):
    """OpenAI CLIP's residual block: packed in_proj (q, k, v with biases), out_proj, ``mlp.c_fc`` / ``mlp.c_proj``."""

    def __init__(self, width: int, heads: int, act: nn.Module):
        super().__init__()
        self.heads, self.act = heads, act
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(width, 4 * width)
        self.mlp.c_proj = nn.Linear(4 * width, width)

    def forward(self, x, mask=None):
        B, N, D = x.shape
        q, k, v = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).split(D, -1)
        q, k, v = (t.reshape(B, N, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        if mask is not None:
            att = att + mask
        x = x + self.attn.out_proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class _Resblocks(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.ModuleList([ClipBlock(width, heads, act) for _ in range(layers)])


class OpenAIClip(nn.Module):
    """OpenAI CLIP (clip/model.py) with a ViT image tower, in its own names (``visual.conv1`` …, ``transformer.*``,
    ``token_embedding``, ``text_projection``, ``logit_scale``). ``quick_gelu`` for weights trained from OpenAI's."""

    def __init__(self, embed: int, v_width: int, v_layers: int, patch: int, img: int, t_width: int, t_layers: int,
                 t_heads: int, ctx: int = 77, vocab: int = 49408, quick_gelu: bool = True, v_heads: int | None = None):
        super().__init__()
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.patch, self.ctx = patch, ctx
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, v_width, patch, patch, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.zeros(v_width))
        self.visual.positional_embedding = nn.Parameter(torch.zeros((img // patch) ** 2 + 1, v_width))
        self.visual.ln_pre = nn.LayerNorm(v_width)
        self.visual.transformer = _Resblocks(v_width, v_layers, v_heads or v_width // 64, act)
        self.visual.ln_post = nn.LayerNorm(v_width)
        self.visual.proj = nn.Parameter(torch.zeros(v_width, embed))
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, t_width))
        self.transformer = _Resblocks(t_width, t_layers, t_heads, act)
        self.ln_final = nn.LayerNorm(t_width)
        self.text_projection = nn.Parameter(torch.zeros(t_width, embed))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        for blk in v.transformer.resblocks:
            x = blk(x)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)  # causal
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection  # the end-of-text token


# ------------------------------------------------------------------------------------------ BERT (no pooler)
class BertLayer(nn.Module):
    def __init__(self, h: int, heads: int, inter: int):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for n in ("query", "key", "value"):
            setattr(self.attention.self, n, nn.Linear(h, h))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(h, h)
        self.attention.output.LayerNorm = nn.LayerNorm(h, eps=1e-12)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, inter)
        self.output = nn.Module()
        self.output.dense = nn.Linear(inter, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=1e-12)

    def forward(self, x, mask):
        B, L, H = x.shape
        s = self.attention.self
        q, k, v = (lin(x).reshape(B, L, self.heads, -1).transpose(1, 2) for lin in (s.query, s.key, s.value))
        att = (q @ k.transpose(-2, -1) / math.sqrt(H // self.heads) + mask).softmax(-1)
        a = self.attention.output.dense((att @ v).transpose(1, 2).reshape(B, L, H))
        x = self.attention.output.LayerNorm(x + a)
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class Bert(nn.Module):
    """A HuggingFace ``BertModel`` built without its pooler (``add_pooling_layer=False``), in HF's names; post-LN,
    exact GELU, LayerNorm eps 1e-12. Returns the last hidden state."""

    def __init__(self, vocab: int, h: int, layers: int, heads: int, inter: int, max_pos: int = 512, types: int = 2):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, h)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, h)
        self.embeddings.token_type_embeddings = nn.Embedding(types, h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLayer(h, heads, inter) for _ in range(layers)])

    def forward(self, ids, pad_id: int = 0):
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings.weight[: ids.shape[1]]
                        + e.token_type_embeddings.weight[0])
        mask = torch.zeros(ids.shape[0], 1, 1, ids.shape[1]).masked_fill((ids == pad_id)[:, None, None, :],
                                                                       torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


# ---------------------------------------------------------------------------------- DermLIP / DermFM-Zero CLIP
class DermLipText(nn.Module):
    """open_clip's HF text tower as the Derm1M fork configures it: BERT, masked mean over tokens (``mean_pooler``),
    a bias-free 2-layer MLP projection (``proj.0``, GELU, ``proj.2``; hidden width (d_model + embed) // 2)."""

    def __init__(self, bert: Bert, width: int, embed: int):
        super().__init__()
        self.transformer = bert
        hidden = (width + embed) // 2
        self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed, bias=False))

    def forward(self, ids, pad_id: int = 0):
        keep = (ids != pad_id).float()
        h = self.transformer(ids, pad_id)
        return self.proj((h * keep[..., None]).sum(1) / keep.sum(-1, keepdim=True))


class DermLipClip(nn.Module):
    """The Derm1M fork's ``CustomTextCLIP`` after its name-based special case: ``visual`` replaced by PanDerm's CAE
    ViT (mean pooling, head with bias to the embedding width), ``text`` = PubMedBERT tower, ``logit_scale``."""

    def __init__(self, embed: int, v_dim: int, v_depth: int, v_heads: int, patch: int, img: int, bert: Bert,
                 t_width: int):
        super().__init__()
        self.visual = CaeViT(v_dim, v_depth, v_heads, patch, img, head_dim=embed, pool="mean_double_norm")
        self.text = DermLipText(bert, t_width, embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        return self.text(ids)


# ------------------------------------------------------------------------------------------------ the catalogue
PUBMEDBERT = dict(vocab=30522, h=768, layers=12, heads=12, inter=3072, max_pos=512, types=2)

PANDERM_FACTS = [
    _src("SiyuanYan1/PanDerm", "classification/models/modeling_finetune.py",
         "VisionTransformer / Block / Attention names: patch_embed.proj, cls_token, pos_embed (2-D sin-cos, "
         "requires_grad False, CLS slot zero), blocks.N.{norm1, attn.qkv (no bias), attn.q_bias, attn.v_bias, "
         "attn.proj, norm2, mlp.fc1, mlp.fc2, gamma_1, gamma_2}, norm; LayerNorm eps 1e-6, exact GELU, "
         "scale head_dim**-0.5; panderm_base_patch16_224: 768/12/12, panderm_large_patch16_224: 1024/24/16, "
         "patch 16, mlp_ratio 4, qkv_bias True; linear-probe forward = class token after the final norm"),
    _src("SiyuanYan1/PanDerm", "classification/models/builder.py",
         "PanDerm_Large_LP: keys' 'encoder.' replaced by '' then load_state_dict(strict=False); PanDerm_Base_LP: "
         "load_state_dict(torch.load(...), strict=False) with no prefix handling; eval transform Resize(256), "
         "CenterCrop(224), ToTensor, Normalize(mean (0.485, 0.456, 0.406), std (0.228, 0.224, 0.225))"),
    _src("SiyuanYan1/PanDerm", "README.md",
         "released files: panderm_bb_data6_checkpoint-499.pth (PanDerm_Base, ViT-B/16, Google Drive id "
         "17J4MjsZu3gdBP6xAQi_NMDVvH65a00HB) and panderm_ll_data6_checkpoint-499.pth (PanDerm Large, ViT-L/16, "
         "Google Drive id 1SwEzaOlFV_gBKf2UzeowMC8z9UH7AQbE)"),
    _src("SiyuanYan1/PanDerm", "segmentation/models/cae_seg.py",
         "the Large file is a flat state dict whose encoder keys carry 'encoder.' (keys kept when 'encoder' in k)"),
]
CAE_FACTS = [
    _src("SiyuanYan1/Derm1M", "src/CAE/models/modeling_cae.py",
         "ContextAutoencoderViT (model_type 'caev2'): encoder, rd_pos_embed, regresser (LatentRegresser), "
         "mask_token, decoder (depth 0, head to num_out_dim 512); alignment_encoder None; encoder_to_regresser "
         "(+ _norm) only when decoder_embed_dim != embed_dim"),
    _src("SiyuanYan1/Derm1M", "src/CAE/models/modeling_cae_helper.py",
         "RegressorBlock: norm1_q, norm1_k, norm1_v, norm2_cross, cross_attn.{q,k,v} (no bias), cross_attn.q_bias, "
         "cross_attn.v_bias, cross_attn.proj, mlp_cross.fc1/fc2, gamma_1_cross, gamma_2_cross; LatentRegresser: "
         "regressor_blocks, norm; Decoder: norm, head"),
    _src("SiyuanYan1/PanDerm", "classification/utils/utils.py",
         "cae_kwargs (ViT-B): regressor_depth 4, decoder_embed_dim 768, decoder_num_heads 12"),
    _src("SiyuanYan1/Derm1M", "src/CAE/scripts/cae_large_1600e.sh",
         "CAE ViT-L pre-training: regressor_depth 4, decoder_embed_dim 1024, decoder_num_heads 16 (PanDerm's own "
         "ViT-L pre-training settings are not published)"),
]
DERMLIP_FACTS = [
    _src("SiyuanYan1/Derm1M", "src/open_clip/model_configs/PanDerm-base-w-PubMed-256.json",
         "embed_dim 512; vision image_size 224, layers 12, width 768, patch 16, pretrain_path "
         "data/pretrain_weight/panderm-base-vit.pth; text context_length 256, hf_model_name / hf_tokenizer_name "
         "neuml/pubmedbert-base-embeddings, hf_pooler_type mean_pooler"),
    _src("SiyuanYan1/Derm1M", "src/open_clip/factory.py",
         "if 'PanDerm-base' in model_name: model.visual = call_PanDerm_base_visual(vision_cfg.pretrain_path); then "
         "an hf-hub checkpoint is loaded over the whole model (load_checkpoint)"),
    _src("SiyuanYan1/Derm1M", "src/open_clip/utils.py",
         "call_PanDerm_base_visual: CAE VisionTransformer(patch 16, 768, depth 12, heads 12, qkv_bias, "
         "init_values 0.1, LayerNorm eps 1e-6, num_classes=512) loaded from the separate PanDerm file with "
         "strict=False"),
    _src("SiyuanYan1/Derm1M", "src/CAE/models/modeling_finetune.py",
         "VisionTransformer defaults use_mean_pooling=True, lin_probe=False: norm = LayerNorm, forward_features "
         "= norm(all tokens) → mean of patch tokens → the same norm; head = Linear(768, 512) with bias"),
    _src("SiyuanYan1/Derm1M", "src/open_clip/model.py",
         "CLIPTextCfg hf_proj_type default 'mlp'; CustomTextCLIP keys visual.*, text.*, logit_scale"),
    _src("SiyuanYan1/Derm1M", "src/open_clip/hf_model.py",
         "HFTextEncoder: add_pooling_layer only for cls_pooler; MeanPooler = masked mean; mlp proj "
         "Linear(d, (d+e)//2, bias False), GELU, Linear(., e, bias False)"),
    {"repository": "huggingface.co/valiance-health/pubmed-bert-onnx", "path": "config.json",
     "commit": "a38243d3eef9b32f21dfd13a564d47c99e46b88a",
     "fact": "neuml/pubmedbert-base-embeddings (ONNX export's config): BERT, vocab 30522, hidden 768, 12 layers, "
             "12 heads, intermediate 3072, max_position_embeddings 512, type_vocab_size 2, layer_norm_eps 1e-12"},
]
DERMFM_ZERO_FACTS = [
    _src("SiyuanYan1/DermFM-Zero", "src/open_clip/factory.py",
         "model_name == 'hf-hub:redlessone/DermFM-Zero' → model.visual = call_PanDerm_large_visual(...)"),
    _src("SiyuanYan1/DermFM-Zero", "src/open_clip/utils.py",
         "call_PanDerm_large_visual: CAE VisionTransformer(patch 16, 1024, depth 24, heads 16, qkv_bias, "
         "init_values 0.1, eps 1e-6, num_classes=768)"),
    _src("SiyuanYan1/DermFM-Zero", "src/open_clip/model_configs/PanDerm-large-w-PubMed-256.json",
         "embed_dim 768; text neuml/pubmedbert-base-embeddings, mean_pooler, context_length 256"),
    _src("SiyuanYan1/DermFM-Zero", "src/CAE/models/modeling_finetune.py",
         "VisionTransformer class identical to Derm1M's (mean pooling, double norm, head with bias)"),
    _src("SiyuanYan1/DermFM-Zero", "README.md",
         "weights at hf-hub:redlessone/DermFM-Zero are private (not yet released)"),
]
CLIP_FACTS = [
    _src("suinleelab/MONET", "src/clip/model.py",
         "OpenAI CLIP: ResidualAttentionBlock with nn.MultiheadAttention (in_proj_weight/bias, out_proj), "
         "mlp c_fc / QuickGELU / c_proj; VisionTransformer conv1 (no bias), class_embedding, positional_embedding, "
         "ln_pre, transformer.resblocks, ln_post, proj; text token_embedding, positional_embedding, transformer, "
         "ln_final, text_projection, logit_scale; the attention mask is not a buffer"),
    _src("suinleelab/MONET", "README.md",
         "clip.load('ViT-L/14', jit=False) then load_state_dict(torch.hub.load_state_dict_from_url("
         "'https://aimslab.cs.washington.edu/MONET/weight_clip.pt')) — strict; HF alternative: chanwkim/monet"),
]
DERMLIP_B16_FACTS = [
    _src("SiyuanYan1/Derm1M", "src/open_clip/model_configs/ViT-B-16.json",
         "embed_dim 512; vision 224 px, 12 layers, width 768, patch 16; text context 77, vocab 49408, width 512, "
         "heads 8, 12 layers"),
    _src("SiyuanYan1/Derm1M", "script/pretrain/ViT-B-16.sh",
         "--model ViT-B-16 --pretrained openai (trained from OpenAI CLIP weights)"),
    _src("SiyuanYan1/Derm1M", "src/open_clip/push_to_hf_hub.py",
         "the uploaded open_clip_config.json holds model_cfg (+ quick_gelu true when pretrained == 'openai') and "
         "preprocess_cfg (mean, std, interpolation, resize_mode)"),
    _src("SiyuanYan1/Derm1M", "README.md", "hub ids hf-hub:redlessone/DermLIP_ViT-B-16, "
                                          "hf-hub:redlessone/DermLIP_PanDerm-base-w-PubMed-256"),
]


def catalogue(small: bool = False) -> dict[str, dict]:
    """name → {build (callable → module), facts, accepted_prefixes, note}. ``small``: reduced widths, same names."""
    if small:
        b = dict(dim=32, depth=2, heads=2, patch=8, img=32)
        L = dict(dim=48, depth=3, heads=3, patch=8, img=32)
        bert = dict(vocab=40, h=24, layers=2, heads=2, inter=48, max_pos=16, types=2)
        clip_l = dict(embed=16, v_width=32, v_layers=2, patch=8, img=32, t_width=32, t_layers=2, t_heads=2, ctx=77,
                      v_heads=2)
        clip_b = dict(clip_l, embed=24, v_width=48, v_heads=3)
        e_b, e_l = 16, 20
    else:
        b = dict(dim=768, depth=12, heads=12, patch=16, img=224)
        L = dict(dim=1024, depth=24, heads=16, patch=16, img=224)
        bert = PUBMEDBERT
        clip_l = dict(embed=768, v_width=1024, v_layers=24, patch=14, img=224, t_width=768, t_layers=12, t_heads=12)
        clip_b = dict(embed=512, v_width=768, v_layers=12, patch=16, img=224, t_width=512, t_layers=12, t_heads=8)
        e_b, e_l = 512, 768

    def vit(s):
        return dict(dim=s["dim"], depth=s["depth"], heads=s["heads"], patch=s["patch"], img=s["img"])

    return {
        "panderm_base": dict(build=lambda: CaeViT(**vit(b)), facts=PANDERM_FACTS, prefixes=["encoder."],
                             note="PanDerm ViT-B/16 encoder (panderm_bb_data6_checkpoint-499.pth)"),
        "panderm_large": dict(build=lambda: CaeViT(**vit(L)), facts=PANDERM_FACTS, prefixes=["encoder."],
                              note="PanDerm ViT-L/16 encoder (panderm_ll_data6_checkpoint-499.pth)"),
        "panderm_cae_v2_pretraining_base": dict(
            build=lambda: CaeV2Pretraining(**vit(b), regressor_depth=2 if small else 4), facts=CAE_FACTS, prefixes=[],
            note="a raw CAE-v2 pre-training checkpoint around the ViT-B/16 encoder"),
        "panderm_cae_v2_pretraining_large": dict(
            build=lambda: CaeV2Pretraining(**vit(L), regressor_depth=2 if small else 4), facts=CAE_FACTS, prefixes=[],
            note="a raw CAE-v2 pre-training checkpoint around the ViT-L/16 encoder (CAE's ViT-L regressor settings)"),
        "dermlip_panderm_base": dict(
            build=lambda: DermLipClip(e_b, b["dim"], b["depth"], b["heads"], b["patch"], b["img"], Bert(**bert),
                                      bert["h"]),
            facts=DERMLIP_FACTS, prefixes=["module."],
            note="DermLIP PanDerm-base-w-PubMed-256 (redlessone/DermLIP_PanDerm-base-w-PubMed-256)"),
        "dermfm_zero": dict(
            build=lambda: DermLipClip(e_l, L["dim"], L["depth"], L["heads"], L["patch"], L["img"], Bert(**bert),
                                      bert["h"]),
            facts=DERMFM_ZERO_FACTS + DERMLIP_FACTS[3:6], prefixes=["module."],
            note="DermFM-Zero (redlessone/DermFM-Zero; weights private at the commit read)"),
        "dermlip_vit_b16": dict(build=lambda: OpenAIClip(**clip_b, quick_gelu=True), facts=DERMLIP_B16_FACTS,
                                prefixes=["module."], note="DermLIP ViT-B/16 (redlessone/DermLIP_ViT-B-16)"),
        "monet_vit_l14": dict(build=lambda: OpenAIClip(**clip_l, quick_gelu=True), facts=CLIP_FACTS,
                              prefixes=["module."], note="MONET (OpenAI CLIP ViT-L/14 fine-tuned; weight_clip.pt)"),
    }


def key_set(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def random_state_dict(module: nn.Module, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Every tensor drawn at random (LayerNorm weights around 1, layer scales around 0.1) — a synthetic checkpoint."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        t = torch.randn(v.shape, generator=g) * scale
        if k.endswith("weight") and ("norm" in k.lower() or k.split(".")[-2].startswith("ln")):
            t = t + 1
        elif ".gamma_" in k:
            t = t + 0.1
        out[k] = t
    if "logit_scale" in out:
        out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out
