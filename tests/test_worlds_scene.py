import numpy as np
import pytest

from minwm.errors import MinwmError
from minwm.worlds.captions import caption, describe
from minwm.worlds.render import pack_scene
from minwm.worlds.scene import Scene, SceneObject, generate_scene


def test_generate_scene_deterministic_per_seed():
    a = generate_scene(np.random.default_rng(7)).to_dict()
    b = generate_scene(np.random.default_rng(7)).to_dict()
    c = generate_scene(np.random.default_rng(8)).to_dict()
    assert a == b and a != c


def test_scene_dict_round_trip():
    s = generate_scene(np.random.default_rng(3))
    assert Scene.from_dict(s.to_dict()) == s


def test_scenes_are_varied():
    scenes = [generate_scene(np.random.default_rng(i)) for i in range(30)]
    kinds = {o.kind for s in scenes for o in s.objects}
    patterns = {o.pattern for s in scenes for o in s.objects}
    assert kinds == {"box", "sphere", "cylinder"} and patterns == {"plain", "striped", "checkered"}
    assert len({s.ground_pattern for s in scenes}) == 3 and len({s.sky for s in scenes}) >= 4
    assert all(6 <= len(s.objects) <= 24 for s in scenes)


def test_caption_names_what_the_first_view_shows():
    objs = [SceneObject("box", (0.0, 0.5, 2.0), (0.2, 0.2, 0.2), "red"),
            SceneObject("sphere", (0.5, 0.5, 3.0), (0.2, 0.2, 0.2), "blue", "striped"),
            SceneObject("sphere", (-0.5, 0.5, 3.5), (0.2, 0.2, 0.2), "blue", "striped"),
            SceneObject("cylinder", (0.0, 0.5, -3.0), (0.2, 0.3, 0.2), "green")]   # behind: not named
    scene = Scene(ground_pattern="checkered", ground_colour="grey", sky="pale blue", objects=objs)
    assert caption(scene) == ("a red box and two striped blue spheres on a grey checkered floor "
                              "under a pale blue sky")
    assert describe(objs[0]) == "red box"
    scene.objects = [SceneObject("box", (0.0, 0.5, 2.0), (0.2, 0.2, 0.2), "orange")]
    assert caption(scene).startswith("an orange box on a grey")
    scene.objects = []
    assert caption(scene) == "a grey checkered floor under a pale blue sky"


def test_pack_scene_rejects_unknown_things():
    bad = Scene(objects=[SceneObject("cone", (0.0, 0.0, 2.0), (0.2, 0.2, 0.2), "red")])
    with pytest.raises(MinwmError, match="object 0"):
        pack_scene(bad)
    with pytest.raises(MinwmError, match="sky"):
        pack_scene(Scene(sky="plaid"))
