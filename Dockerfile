# vllm-activations on a RunPod GPU pod: vLLM 0.32.0 + the capture plugin + the HTTP sidecar.
#
#   docker build -t YOUR_REGISTRY_USER/vllm-activations:0.1.0 .
#   docker push YOUR_REGISTRY_USER/vllm-activations:0.1.0
#
# Configured by environment variables (runpod/entrypoint.py lists them; runpod/GUIDE.md explains
# them). The image keeps the base image's torch and vLLM: tests/test_runpod.py runs the same
# pip commands as below (with --dry-run) and checks that nothing here can replace them.
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/hf

WORKDIR /opt/vllm-activations
COPY pyproject.toml README.md ./
COPY vllm_activations/ vllm_activations/
COPY client/ client/
COPY runpod/entrypoint.py runpod/entrypoint.py

# 1. Record every installed version as a constraint, so no later step can change torch or vLLM.
# 2. The package itself, without its dependencies.
# 3. Only the dependencies the image lacks (h5py, openlocationcode, matplotlib for the [plots]
#    extra, so `actclient analyze` on the pod draws its pictures; maybe httpx);
#    fastapi/uvicorn/numpy come with vLLM and the constraints keep them at the image's versions.
RUN python3 -m pip list --format=freeze > /tmp/image-constraints.txt \
    && python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -m pip install --no-cache-dir -c /tmp/image-constraints.txt \
        "numpy>=1.24" "h5py>=3.9" "httpx>=0.27" "openlocationcode>=1.0.1" \
        "fastapi>=0.110" "uvicorn>=0.29" "matplotlib>=3.7" \
    && rm /tmp/image-constraints.txt \
    && python3 -c "import vllm_activations, actclient, h5py, fastapi, uvicorn, httpx, matplotlib"

# The sidecar is the only port; vLLM itself listens on loopback inside the container.
EXPOSE 8000

# The first start downloads ~33 GB of weights into /workspace/hf: allow for it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=5)"]

# The base image's ENTRYPOINT is ["vllm", "serve"]; replace it, and clear its CMD.
ENTRYPOINT ["python3", "/opt/vllm-activations/runpod/entrypoint.py"]
CMD []
