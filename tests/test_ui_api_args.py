"""/generate's arguments from any API client: every bad value gets our one-line message (not Gradio's generic
error), non-ASCII digits are refused rather than read as numbers, and the app keeps running."""

from __future__ import annotations

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.test_ui_api import TINY, App

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    app = App(tmp_path_factory.mktemp("ui_api_args"), tiny_dir)
    yield app
    app.close()


@pytest.mark.parametrize("values,message", [
    ({"seed": "abc"}, "Seed (--seed) must be a whole number (got 'abc')"),
    ({"seed": 1.5}, "Seed (--seed) must be a whole number (got 1.5)"),
    ({"memory_profile": "²"}, "Memory profile must be 'default'"),
    ({"memory_profile": "٣"}, "Memory profile must be 'default'"),
    ({"width": "wide"}, "Width (--width) must be a whole number (got 'wide')"),
    ({"height": None}, "Height (--height) is missing"),
    ({"steps": "٣"}, "Steps (--steps) must be a whole number (got '٣')"),
    ({"guidance": None}, "Guidance (--guidance) is missing"),
    ({"flow_shift": "1e999"}, "Flow shift (--flow-shift) must be a"),
    ({"num_images": True}, "Number of images (--num-images) must be a whole number (got True)"),
    ({"prompt": None}, "the prompt is empty"),
    ({"prompt": ["a", "fox"]}, "Prompt must be text (got list)"),
    ({"model_type": ["z_image_tiny"]}, "Model must be text (got list)"),
    ({"model_type": "z_image_huge"}, "unknown model type 'z_image_huge'"),
    ({"loras": "style=1e308"}, "LoRA 'style' strength: LoRA strength '1e308' must be between -10 and 10"),
    ({"loras": "style=٣"}, "LoRA 'style' strength"),
    ({"loras": "[" * 100000 + "]" * 100000}, "LoRAs: the value is nested more than 32 levels deep"),
])
def test_bad_generate_values_get_our_message(served, values, message):
    before = len(served.jobs())
    with pytest.raises(AppError) as e:
        served.client.predict(**{"prompt": "a fox", **TINY, **values}, api_name="/generate")
    assert message in str(e.value), str(e.value)
    assert len(served.jobs()) == before


def test_numbers_in_text_and_the_app_keeps_running(served):
    """ASCII numbers sent as text are numbers (a slider's value may arrive as a string)."""
    ids = served.client.predict(prompt="still up", **{**TINY, "width": "64", "steps": "1", "seed": "7",
                                                    "guidance": "0"}, memory_profile="2", api_name="/generate")
    job = served.wait_done(ids.split(","))[ids]
    assert job["status"] == "done", job["error"]
    assert (job["spec"]["width"], job["spec"]["num_inference_steps"], job["spec"]["seed"],
            job["spec"]["guidance_scale"], job["spec"]["memory_profile"]) == (64, 1, 7, 0.0, 2)


def small_bomb(path):
    """A PNG of a few KB that declares 12000 x 12000 px (144 MP: under Pillow's own refusal, 179 MP)."""
    Image.new("1", (12000, 12000)).save(path)
    return str(path)


def test_a_bare_input_file_is_the_input_image(served, tmp_path):
    """handle_file("x.png") as image (the README's API form) is an img2img job, like the editor's dict form;
    Gradio had turned it into an editor without a background: a text-to-image job, strength ignored."""
    picture = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (120, 130, 140)).save(picture)
    for image in (handle_file(str(picture)), {"background": handle_file(str(picture)), "layers": [],
                                              "composite": None}):
        ids = served.client.predict(prompt="a fox", **TINY, image=image, strength=0.5, api_name="/generate")
        job = served.wait_done(ids.split(","))[ids]
        assert job["status"] == "done", job["error"]
        assert job["spec"]["image"] and job["spec"]["strength"] == 0.5


@pytest.mark.parametrize("content,message", [
    (b"", "file 'x.png' is not an image PIL can read"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "file 'x.png' is"),
    (None, "file 'x.png' is too large: at most 16384 px a side and 64 megapixels (it is 12000x12000)"),
])
@pytest.mark.parametrize("form", ["file", "editor", "layer", "mask"])
def test_a_bad_upload_gets_our_message_naming_no_server_path(served, tmp_path, content, message, form):
    """A zero-byte, corrupt or decompression-bomb upload is one line naming the file (not Gradio's bare
    "Error"), whether it is the input image, a painted layer or the mask; a bomb is refused from its header."""
    bad = tmp_path / "x.png"
    small_bomb(bad) if content is None else bad.write_bytes(content)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (120, 130, 140)).save(good)
    image = {"file": handle_file(str(bad)),
             "editor": {"background": handle_file(str(bad)), "layers": [], "composite": None},
             "layer": {"background": handle_file(str(good)), "layers": [handle_file(str(bad))], "composite": None},
             "mask": handle_file(str(good))}[form]
    extra = {"mask": handle_file(str(bad))} if form == "mask" else {}
    before = len(served.jobs())
    with pytest.raises(AppError) as e:
        served.client.predict(prompt="a fox", **TINY, image=image, **extra, api_name="/generate")
    text = str(e.value)
    assert message in text and "/tmp" not in text and "\n" not in text.strip(), text
    assert len(served.jobs()) == before
