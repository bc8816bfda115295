"""The file names of the experiments' outputs and of the runs index, in one place (a light module: no matplotlib)."""

from __future__ import annotations

ALIGNED_HTML = "aligned.html"
ALIGNED_JSON = "aligned.json"
ALIGNED_MANIFEST = "aligned.manifest.json"  # the aligned report's own manifest beside the experiment's run directories
DIFFUSION_HTML = "diffusion.html"
DIFFUSION_JSON = "diffusion.json"
INDEX = "index.html"  # the runs index page at the root of a runs folder
