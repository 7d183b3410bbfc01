#!/usr/bin/env bash
# Debian packages the test suite drives for real: headless Chromium and its driver (browser
# tests of the audit UI), Prometheus (the dashboards' PromQL runs against it), Alertmanager (the
# alertmanager sink posts to a real one), docker-compose (validates deploy/compose.yaml; no
# Docker engine is needed for `config`). Installed only when missing; needs root or sudo.
# Called by scripts/test.sh.
set -euo pipefail
want=()
command -v chromium >/dev/null || want+=(chromium)
command -v chromedriver >/dev/null || want+=(chromium-driver)
command -v prometheus >/dev/null || want+=(prometheus)
command -v prometheus-alertmanager >/dev/null || want+=(prometheus-alertmanager)
command -v docker-compose >/dev/null || want+=(docker-compose)
if [ ${#want[@]} -eq 0 ]; then
    exit 0
fi
echo "installing Debian packages: ${want[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# The packages' own services are not wanted: the tests start Prometheus and Alertmanager
# themselves, on free ports.
$SUDO apt-get update -q >/dev/null || echo "apt-get update failed; trying the cached lists"
$SUDO apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null
