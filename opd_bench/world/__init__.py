"""The embedded "tiny" world: 64x64 scenes of coloured shapes and short texts.

* :mod:`opd_bench.world.spec` - vocabulary (shapes, colours, sizes, backgrounds, font);
* :mod:`opd_bench.world.render` - ``render(record, seed)`` draws a correct image for a prompt;
* :mod:`opd_bench.world.prompts` - seeded generators of the geneval / ocr / pref prompt files;
* :mod:`opd_bench.world.detect` - ``detect(image)`` finds the shapes (numpy + scipy).
"""

from opd_bench.world.spec import PROMPTS_VERSION

__all__ = ["PROMPTS_VERSION"]
