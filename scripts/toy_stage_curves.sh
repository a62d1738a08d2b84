#!/usr/bin/env bash
# Short toy run of every stage on real procedural latents, for the loss curves (each stage writes
# OUT/<stage>/loss_curve.png and metrics.json). Usage: scripts/toy_stage_curves.sh [OUT]   (default runs/toy_curves)
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/minwm
O=${1:-runs/toy_curves}
C=$O/toy_curves.yaml
mkdir -p "$O"
s() { echo "== $1 $(date +%T)"; /usr/bin/time -f "$1 wall %e s cpu %U s" "${@:2}"; }
[ -f "$O/clips/index.json" ] || s render $M data render --config configs/toy.yaml --out "$O/clips" --quiet
[ -f "$O/vae/metrics.json" ] || s vae $M train vae --config configs/toy.yaml --out "$O/vae"
# The toy config with this run's codec and latent cache.
.venv/bin/python - "$O" <<'PY'
import sys, yaml
out = sys.argv[1]
c = yaml.safe_load(open("configs/toy.yaml"))
c["codec"]["vae"], c["stages"]["latents"] = f"{out}/vae", f"{out}/latents"
c["stages"]["vae"]["data"] = f"{out}/clips"
yaml.safe_dump(c, open(f"{out}/toy_curves.yaml", "w"), sort_keys=False)
PY
s encode $M data encode --config "$C" --data "$O/clips" --out "$O/latents" --quiet
s bidirectional $M train bidirectional --config "$C" --out "$O/bidirectional" --max-steps 100
s ar $M train ar --config "$C" --init "$O/bidirectional" --out "$O/ar" --max-steps 60
s cd $M train cd --config "$C" --init "$O/ar" --init teacher="$O/ar" --out "$O/cd" --max-steps 200
s ode-data $M train ode-data --config "$C" --init teacher="$O/ar" --out "$O/ode_data" --max-steps 24
s ode $M train ode --config "$C" --init "$O/ar" --init data="$O/ode_data" --out "$O/ode" --max-steps 100
s dmd $M train dmd --config "$C" --init "$O/cd" --init real="$O/bidirectional" --init fake="$O/bidirectional" \
  --out "$O/dmd" --max-steps 40
echo "== done $(date +%T)"
