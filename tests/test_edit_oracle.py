"""Edit LoRAs against diffusers, float64 on tiny random weights (oracle.md §7.1, §7.6): the training
forward with reference tokens equals Flux2Transformer2DModel on the same packed inputs, and
Flux2Pipeline(image=[...]) with our LoRA loaded through `load_lora_weights` gives sample.py's
image; the README's toy_edit commands run."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import flux2
import lora
import models
import sample
import train
from test_dit import CONFIGS, random_reference
from test_sample import PROMPT, STEPS, H, W, diffusers_images, rel, tiny  # noqa: F401 (fixture)
from weights import load_flux2


class Recorder(torch.nn.Module):
    """Passes the call through to `model` and keeps its arguments and output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args):
        out = self.model(*args)
        self.calls.append((args, out))
        return out


def test_training_forward_with_two_references_matches_diffusers(tmp_path):
    """flow_matching_loss packs a 3x4 target, then a 2x2 and a 4x3 reference (time ids 10, 20); the
    model's output on that sequence equals diffusers' for every token, batch of 2, and the loss is
    the MSE over the target tokens only."""
    config = CONFIGS["guided"]
    ref = random_reference(config)
    ref.save_pretrained(tmp_path / "transformer")
    ours = Recorder(load_flux2(tmp_path / "transformer", dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    C, (h, w) = config["in_channels"], (3, 4)
    x0, noise = torch.randn(2, 2, C, h, w, generator=g, dtype=torch.float64)
    refs = [torch.randn(2, C, 2, 2, generator=g, dtype=torch.float64),
            torch.randn(2, C, 4, 3, generator=g, dtype=torch.float64)]
    txt = torch.randn(2, 5, config["joint_attention_dim"], generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    with torch.no_grad():
        loss = train.flow_matching_loss(ours, x0, txt, t, noise, guidance=2.5, refs=refs)

    (img, img_ids, txt_in, txt_ids, timesteps, guidance), got = ours.calls[0]
    x_t = (1 - t.view(2, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1) * noise
    assert torch.equal(img, torch.cat([flux2.pack(x_t), *map(flux2.pack, refs)], dim=1))
    want_ids = torch.cat([flux2.image_ids(h, w), flux2.image_ids(2, 2, t=10),
                          flux2.image_ids(4, 3, t=20)])                          # [12 + 4 + 12, 4]
    assert torch.equal(img_ids.expand(2, -1, -1), want_ids[None].expand(2, -1, -1))
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt_in,
                   img_ids=img_ids.expand(2, -1, -1), txt_ids=txt_ids.expand(2, -1, -1),
                   timestep=timesteps, guidance=guidance, return_dict=False)[0]   # [2, 28, C]
    assert got.shape == want.shape == (2, h * w + 4 + 12, C)
    assert rel(got, want) <= 1e-6                   # observed 2e-8: fp32 RoPE (oracle §7.1)
    assert rel(got[:, :h * w], want[:, :h * w]) <= 1e-6
    target = flux2.pack(noise - x0)
    assert loss.item() == pytest.approx((want[:, :h * w] - target).square().mean().item(), rel=1e-6)


def test_pipeline_with_reference_and_our_lora_matches_sample(tiny, tmp_path):
    """A LoRA written by lora.save (BFL names under diffusion_model., alpha baked into B) loads
    into Flux2Pipeline with load_lora_weights; editing with it gives sample.py's pixels."""
    pipe, stack = tiny
    trained = copy.deepcopy(stack.dit)
    lora.inject(trained, "paper", rank=4, alpha=8)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in lora.adapters(trained).values():       # B = 0 at init would make the LoRA a no-op
            m.lora_B.copy_(0.5 * torch.randn(m.lora_B.shape, generator=g))
    file = tmp_path / "edit.safetensors"
    lora.save(trained, file)
    ref_img = Image.fromarray(torch.randint(0, 256, (100, 72, 3), generator=g,
                                            dtype=torch.uint8).numpy())
    txt = models.encode_text(stack, [PROMPT])
    with_lora = dataclasses.replace(stack, dit=copy.deepcopy(stack.dit))
    lora.load(with_lora.dit, file)
    kw = dict(txt=txt, width=W, height=H, steps=STEPS, guidance=4.0, seeds=[8], refs=[ref_img])
    ours = sample.generate_tensors(with_lora, **kw)
    base = sample.generate_tensors(stack, **kw)
    pipe.load_lora_weights(str(file))
    try:
        want = diffusers_images(pipe, seed=8, image=[ref_img], prompt_embeds=txt)
    finally:
        pipe.unload_lora_weights()
    assert rel((ours + 1) / 2, want) <= 1e-7            # as without a LoRA (observed 1e-8)
    assert rel(ours, base) > 1e-2                       # the LoRA does change the image


def test_toy_edit_trains_and_samples_with_its_reference(tmp_path):
    """The README's edit commands on the bundled examples/toy_edit (tiny model, a few steps)."""
    toy = Path(__file__).resolve().parents[1] / "examples" / "toy_edit"
    out = tmp_path / "out"
    assert train.main(["--data", str(toy / "images"), "--control-dir", str(toy / "control"),
                       "--model", "tiny", "--steps", "2", "--device", "cpu", "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache"), "--sample-every", "0",
                       "--save-every", "0"]) == 0
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        assert f.metadata()["edit"] == "true" and f.metadata()["references"] == "1"
    png = tmp_path / "red.png"
    assert sample.main(["--model", "tiny", "--lora", str(out / "lora.safetensors"), "--ref",
                        str(toy / "control" / "ring.png"), "--prompt", "make the ring red",
                        "--width", "64", "--height", "48", "--steps", "2", "--out", str(png),
                        "--device", "cpu"]) == 0
    assert Image.open(png).size == (64, 48)
    assert Image.open(png).text["refs"] == json.dumps([str(toy / "control" / "ring.png")])
