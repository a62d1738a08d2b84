import torch

from minwm.cli import main
from minwm.codecs.vae import VideoCodec
from minwm.data.latent_cache import LatentDataset

torch.set_num_threads(1)
TINY = {"base_dim": 4, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "attn_scales": [],
        "temperal_downsample": [True, True]}


def test_data_encode_command(tmp_path, capsys):
    from minwm.data.clips import DataConfig
    from minwm.data.procedural import render_dataset
    render_dataset(DataConfig(num_clips=3, frames=5, height=16, width=16, seed=0), tmp_path / "clips", progress=False)
    VideoCodec.from_config(TINY).save_pretrained(tmp_path / "vae")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("codec:\n  text: {max_text_len: 8}\n  shard_clips: 2\n")
    # No VAE named: a one-line error, exit code 2, nothing written.
    assert main(["data", "encode", "--config", str(cfg), "--data", str(tmp_path / "clips"),
                 "--out", str(tmp_path / "cache"), "--quiet"]) == 2
    assert "codec.vae is not set" in capsys.readouterr().err and not (tmp_path / "cache").exists()
    cfg.write_text(f"codec:\n  vae: {tmp_path / 'vae'}\n  text: {{max_text_len: 8}}\n  shard_clips: 2\n")
    assert main(["data", "encode", "--config", str(cfg), "--data", str(tmp_path / "clips"),
                 "--out", str(tmp_path / "cache"), "--quiet"]) == 0
    ds = LatentDataset(tmp_path / "cache")
    assert len(ds) == 3 and ds[0]["latents"].shape == (4, 2, 4, 4) and ds[0]["embeds"].shape == (8, 32)
    assert ds[0]["caption"] and ds.cameras(0).w2c.shape == (2, 4, 4)
