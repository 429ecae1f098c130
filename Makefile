# Every target installs what it needs first: a fresh Debian 12 machine runs
# `make quickstart` or `make test` with nothing else done by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := qemu-utils qemu-system-x86 qemu-block-extra xfsprogs e2fsprogs btrfs-progs \
	util-linux mount tgt nginx docker-registry skopeo busybox-static linux-image-amd64 \
	cpio zstd xz-utils gzip tar genisoimage procps iproute2 open-iscsi ovmf syslinux syslinux-common \
	mtools dosfstools nbdkit bubblewrap passt python3-minimal qemu-guest-agent
STAMP_DEB := $(VENV)/.deb-stamp
STAMP_PY := $(VENV)/.py-stamp

.PHONY: all deps quickstart test bench proto crds clean

all: test

$(STAMP_DEB):
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP_PY): pyproject.toml $(STAMP_DEB)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

deps: $(STAMP_PY)

quickstart: deps
	$(VENV)/bin/pvlun quickstart

test: deps
	$(PY) -m pytest -n 2 --dist loadfile --basetemp=/tmp/pvlun-tests tests  # short: Unix socket paths have at most 107 bytes

bench: deps
	$(PY) -m bench

proto: deps
	$(PY) -m csi.proto.generate

crds: deps
	$(PY) deploy/crds.py

clean:
	rm -rf $(VENV) build *.egg-info
