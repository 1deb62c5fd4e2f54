from pathlib import Path

import pytest

from lora_core.runconfig import RunConfig

BASE = {"base_model": "sd15.safetensors", "train_data_dir": "/data/cat", "max_steps": 100}


def test_minimal_config_and_kohya_aliases():
    cfg = RunConfig.from_mapping({**BASE, "network_dim": 8, "network_alpha": 4, "learning_rate": "1e-4"})
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate) == (8, 4.0, 1e-4)
    assert cfg.adapter_config().rank == 8
    assert cfg.train_config(100).learning_rate == 1e-4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lora_rnak": 8}, r"unknown config key 'lora_rnak' \(did you mean 'lora_rank'\?\)"),
        ({"lora_rank": 0}, r"lora_rank=0 is out of range; allowed: \[1, 1024\]"),
        ({"optimizer": "adam"}, r"optimizer='adam' is not allowed; choose one of: adamw"),
        ({"lr_scheduler": "poly"}, r"lr_scheduler='poly' is not allowed; choose one of: constant"),
        ({"mixed_precision": "fp8"}, r"mixed_precision='fp8' is not allowed"),
        ({"resolution": 500}, r"resolution=500 must be a multiple of 64"),
        ({"epochs": 3}, r"set exactly one of epochs \(now 3\) or max_steps \(now 100\)"),
        ({"sample_every": 10}, r"sample_prompts is empty"),
        ({"output_name": "../x"}, r"output_name='../x' may only use"),
        ({"gradient_checkpointing": "yes"}, r"gradient_checkpointing='yes' must be true or false"),
        ({"batch_size": 1.5}, r"batch_size=1.5 must be a whole number"),
        ({"clip_l": "clip_l.safetensors", "t5xxl": "t5.safetensors"},
         r"clip_l, t5xxl given without ae: a model in separate files needs t5xxl \(T5-XXL\) and ae"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_the_allowed_values(extra, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_mapping({**BASE, **extra})


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig.from_mapping({**BASE, "sample_prompts": ["a cat"], "sample_every": 50})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: x\ntrain_data_dir: y\nmax_steps: 10\nlearning_rat: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'learning_rat'"):
        RunConfig.from_yaml(path)


def test_the_shipped_example_config_is_valid():
    from pathlib import Path

    cfg = RunConfig.from_yaml(Path(__file__).resolve().parents[2] / "examples" / "train_sd15.yaml")
    assert cfg.max_steps == 1500 and cfg.sample_prompts == ("sks, a photo on a beach",)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_shipped_example_config_is_listed_here():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(SHIPPED)


SHIPPED = {"train_sd15": (), "train_sdxl": (), "train_sd35": (), "train_flux": ("clip_l", "t5xxl", "ae"),
           "train_chroma": ("t5xxl", "ae"), "train_wan": ("t5xxl", "ae")}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_shipped_example_configs_are_valid(name):
    cfg = RunConfig.from_yaml(EXAMPLES / f"{name}.yaml")
    assert cfg.split_files == SHIPPED[name]  # a checkpoint, FLUX.1 in separate files, Chroma in separate files
    if name in ("train_sd35", "train_flux", "train_chroma"):  # flow models: min-SNR off, the model's own shift
        assert cfg.min_snr_gamma == 0 and cfg.discrete_flow_shift == 0
    if name == "train_wan":  # musubi's --dit / --t5 / --vae spelling, the clip settings, CLIPLoader type wan
        assert cfg.base_model.startswith("wan2.1_t2v") and cfg.text_encoder_type == "wan"
        assert (cfg.target_frames, cfg.frame_extraction, cfg.frame_sample, cfg.expert) == (33, "uniform", 2, "all")


def test_the_headless_epoch_count_groups_clip_windows_by_frame_count_and_needs_fps_for_clips(tmp_path):
    """kiln.py counts an epoch as the trainer batches it: samples of one latent shape (bucket and frame count)
    together; with clips, epochs need the frame rate (auto is read from the VAE only once the graph runs)."""
    import av
    import numpy as np
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(tmp_path / f"img{i}.png")
    with av.open(str(tmp_path / "walk.mp4"), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(40):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 5 * i, np.uint8), "rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    base = {"base_model": "wan.safetensors", "train_data_dir": str(tmp_path), "resolution": 64, "batch_size": 4,
            "target_frames": 9, "frame_extraction": "uniform", "frame_sample": 3}
    # 3 images (one batch) and 3 clip windows (another): not one batch of 4 and one of 2
    assert RunConfig.from_mapping({**base, "max_steps": 10, "fps": 16}).steps_per_epoch() == 2
    with pytest.raises(ValueError, match=r"epochs with video clips needs the frame rate.*set fps \(16 for Wan 2.1"):
        RunConfig.from_mapping({**base, "epochs": 2}).steps_per_epoch()
