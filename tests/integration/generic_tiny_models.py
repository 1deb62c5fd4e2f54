"""Tiny random configurations of ComfyUI v0.33's image models that have no Kiln family entry: the generic path's
test set (tests/integration/test_generic_families.py). Each builds with ComfyUI's own supported_models class (the
tiny values re-applied over its ``unet_extra_config``), a few hundred thousand parameters; ``cond`` gives the
text-encoder outputs CLIPTextEncode would put into the conditioning (context, pooled vector and the encoder's other
outputs), ``latent`` one sample's latent shape (4 entries: a one-frame video latent).

Found by reading each model's detection and constructor in ComfyUI v0.33 and checked to build and run forward and
backward; JoyImage, Anima and ErnieImage (rope kernels without a backward), LongCatImage (input prepared outside its
network) and CosmosT2IPredict2 (EDM sampling) are refused by Kiln instead, and listed in REFUSED_GENERIC.
"""

from __future__ import annotations

TINY_GENERIC = {
    "Lumina2": {
        "unet_config": dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32, n_layers=1,
                            n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=1, axes_dims=[8, 12, 12],
                            axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0, multiple_of=32),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32)},
        "latent": (16, 8, 8),
        "params": 253792,
    },
    "AuraFlow": {
        "unet_config": dict(cond_seq_dim=2048, max_seq=256, n_double_layers=1, n_layers=2, dim=64, global_conddim=64,
                            n_heads=2, in_channels=4, out_channels=4, patch_size=2),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 2048)},
        "latent": (4, 16, 16),
        "params": 449216,
    },
    "PixArtAlpha": {
        "unet_config": dict(image_model="pixart_alpha", patch_size=2, hidden_size=96, in_channels=4, depth=2, num_heads=2,
                            caption_channels=32, model_max_length=8, input_size=16, micro_condition=True),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32)},
        "latent": (4, 48, 48),  # PixArt pos-embed base_size = round(((H+W)//2)/64)*64//patch -> H,W >= 40 or ZeroDivisionError
        "params": 424384,
    },
    "PixArtSigma": {
        "unet_config": dict(image_model="pixart_sigma", patch_size=2, hidden_size=96, in_channels=4, depth=2, num_heads=2,
                            caption_channels=32, model_max_length=8, input_size=16, micro_condition=False),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32)},
        "latent": (4, 48, 48),
        "params": 405824,
    },
    "HunyuanDiT": {
        "unet_config": dict(image_model="hydit", depth=4, hidden_size=64, num_heads=2, patch_size=2, in_channels=4,
                            input_size=16, text_states_dim=32, text_states_dim_t5=32, text_len=8, text_len_t5=8),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32), "attention_mask": torch.ones(1, 8),
                                      "conditioning_mt5xl": torch.randn(1, 8, 32), "attention_mask_mt5xl": torch.ones(1, 8)},
        "latent": (4, 16, 16),
        "params": 633856,
    },
    "HunyuanDiT1": {
        "unet_config": dict(image_model="hydit1", depth=4, hidden_size=64, num_heads=2, patch_size=2, in_channels=4,
                            input_size=16, text_states_dim=32, text_states_dim_t5=32, text_len=8, text_len_t5=8,
                            size_cond=True, use_style_cond=True),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32), "attention_mask": torch.ones(1, 8),
                                      "conditioning_mt5xl": torch.randn(1, 8, 32), "attention_mask_mt5xl": torch.ones(1, 8)},
        "latent": (4, 16, 16),
        "params": 1043520,
    },
    "HunyuanImage21": {
        "unet_config": dict(image_model="hunyuan_video", vec_in_dim=None, in_channels=64, out_channels=64, patch_size=[1, 1],
                            axes_dim=[16, 16], meanflow=False, context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2,
                            depth=1, depth_single_blocks=1, theta=256, qkv_bias=True, byt5=False, guidance_embed=False,
                            use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32)},
        "latent": (64, 8, 8),
        "params": 394560,
    },
    "HiDream": {
        "unet_config": dict(image_model="hidream", attention_head_dim=32, axes_dims_rope=[16, 8, 8], caption_channels=[32, 24],
                            max_resolution=[128, 128], in_channels=16, llama_layers=[0, 1], num_attention_heads=2,
                            num_routed_experts=2, num_activated_experts=1, num_layers=1, num_single_layers=1,
                            out_channels=16, patch_size=2, text_emb_dim=16),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32), "conditioning_llama3": torch.randn(1, 2, 8, 24),
                                      "pooled_output": torch.randn(1, 16)},
        "latent": (16, 8, 8),
        "params": 517120,
    },
    "Omnigen2": {
        "unet_config": dict(image_model="omnigen2", axes_dim_rope=[8, 12, 12], axes_lens=[1024, 1664, 1664], ffn_dim_multiplier=None,
                            hidden_size=64, in_channels=16, multiple_of=32, norm_eps=1e-5, num_attention_heads=2, num_kv_heads=1,
                            num_layers=1, num_refiner_layers=1, out_channels=None, patch_size=2, text_feat_dim=32, timestep_scale=1000.0),
        # Omnigen2.extra_conds only emits the required num_tokens when attention_mask is given
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32), "attention_mask": torch.ones(1, 8, dtype=torch.long)},
        "latent": (16, 8, 8),
        "params": 336672,
    },
    "Boogu": {
        "unet_config": dict(image_model="boogu", hidden_size=64, num_layers=1, num_double_stream_layers=1, num_refiner_layers=1,
                            instruction_feat_dim=32, num_attention_heads=2, num_kv_heads=1, multiple_of=32,
                            axes_dim_rope=[8, 12, 12], axes_lens=[2048, 1664, 1664]),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32), "attention_mask": torch.ones(1, 8, dtype=torch.long)},
        "latent": (16, 8, 8),
        "params": 560032,
    },
    "MageFlow": {
        "unet_config": dict(image_model="mage_flow", in_channels=128, out_channels=128, num_layers=1, attention_head_dim=32,
                            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[8, 12, 12]),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32)},
        "latent": (128, 4, 4),
        "params": 197152,
    },
    "Ideogram4": {
        "unet_config": dict(image_model="ideogram4", in_channels=128, num_layers=1, num_attention_heads=2, attention_head_dim=32,
                            intermediate_size=128, adaln_dim=32, llm_features_dim=64, rope_theta=5000000,
                            mrope_section=[6, 5, 5], norm_eps=1e-5),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 64)},
        "latent": (128, 4, 4),
        "params": 83168,
    },
    "Krea2": {
        "unet_config": dict(image_model="krea2", features=128, channels=16, patch=2, layers=1, heads=4, kvheads=2,
                            txtlayers=2, txtdim=32, txtheads=2, txtkvheads=2, tdim=256),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 64)},
        "latent": (16, 1, 8, 8),
        "params": 470306,
    },
    "Lens": {
        "unet_config": dict(image_model="lens", in_channels=128, out_channels=32, num_layers=1, num_attention_heads=2,
                            attention_head_dim=32, axes_dims_rope=[8, 12, 12], enc_hidden_dim=32,
                            multi_layer_encoder_feature=True, selected_layer_index=(0, 1)),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 64)},
        "latent": (128, 4, 4),
        "params": 198592,
    },
    "Kandinsky5Image": {
        # NOTE: supported_models match dict wants model_dim=2560 (-> ~100M+ per block); tiny uses 64, so
        # Kandinsky5Image.matches() is False (irrelevant when the class is built directly).
        "unet_config": dict(image_model="kandinsky5", model_dim=64, visual_embed_dim=64, in_visual_dim=16, out_visual_dim=16,
                            in_text_dim=32, in_text_dim2=16, time_dim=32, ff_dim=128, patch_size=(1, 2, 2),
                            num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12), rope_scale_factor=(1.0, 1.0, 1.0)),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32), "pooled_output": torch.randn(1, 16)},
        "latent": (16, 8, 8),
        "params": 133088,
    },
}


# ComfyUI's class -> a word of the reason Kiln's refusal gives
REFUSED_GENERIC = {"LongCatImage": "outside the network", "JoyImage": "rope kernels", "Anima": "rope kernels",
                   "ErnieImage": "rope kernels", "CosmosT2IPredict2": "samples with"}

# refused models built for real (the refusal reads the model, not only its name)
REFUSED_TINY = {
    "LongCatImage": {
        "unet_config": dict(image_model="flux", guidance_embed=False, vec_in_dim=None, context_in_dim=3584, txt_ids_dims=[1, 2],
                            axes_dim=[8, 12, 12], num_heads=2, mlp_ratio=4.0, theta=10000, out_channels=16, qkv_bias=True,
                            in_channels=16, hidden_size=64, patch_size=2, depth=1, depth_single_blocks=1),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 3584)},
        "latent": (16, 8, 8),
        "params": 478400,
    },
    "CosmosT2IPredict2": {
        "unet_config": dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
                            out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64, concat_padding_mask=True,
                            crossattn_emb_channels=32, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
                            min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16, num_blocks=1, num_heads=2,
                            extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
                            rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0,
                            extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False),
        "cond": lambda torch: {"cross_attn": torch.randn(1, 8, 32)},
        "latent": (16, 1, 8, 8),
        "params": 101824,
    },
}
