# One image for every Sidemesh process: CA, controller, injector, and the injected sidecar and
# init container.  docker build -t ghcr.io/sidemesh/sidemesh:latest .
#
# Runs as the non-root user 1337 (the sidecar's UID, which `proxy init` exempts from the capture).
# The injected sidemesh-init container alone overrides this with runAsUser: 0 and NET_ADMIN/NET_RAW
# to install the iptables rules; that is why iptables is in the image.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidemesh ./sidemesh
COPY ca ./ca
COPY controller ./controller
COPY injector ./injector
COPY proxy ./proxy
# Installed into a prefix and copied over, so the final image has no build leftovers. No bytecode
# here: the final stage compiles it all, at both levels (below).
RUN pip install --no-cache-dir --no-compile --prefix=/install .

FROM python:3.11-slim
# iptables ships both the nft and the legacy backends; `proxy init` runs `iptables-restore`, which
# Debian's alternatives point at nft (a node whose kernel has no nf_tables needs the image switched to
# legacy: update-alternatives --set iptables /usr/sbin/iptables-legacy). iproute2: `ip` puts ::6 on lo.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1337 sidemesh \
    && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sidemesh
COPY --from=build /install /usr/local
# Bytecode for the whole library, at the two levels the processes run at: plain (CA, controller,
# injector) and -OO (the sidecar: the injector sets PYTHONOPTIMIZE=2); pip compiled none above.
# python:3.11-slim ships its standard library without bytecode, and the root
# filesystem is read-only: without this every process compiles what it imports at each start,
# which costs a sidecar 1.7 MB of heap for the standard library alone, and start time (measured;
# bench/l4.py compile_bytecode runs the benchmarks' sidecars from bytecode compiled the same way).
RUN python -m compileall -q -j 0 -o 0 -o 2 /usr/local/lib/python3.11
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 1337:1337
ENTRYPOINT ["sidemesh"]
CMD ["--help"]
