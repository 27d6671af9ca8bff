"""In-process Qwen2.5-VL: weights loaded once from a local folder, one greedy generation per request.

The weights are a local folder or a hub id already in the local Hugging Face cache (resolved by
`model_dir_revision`, which never touches the network); a run never downloads, with or without HF_HUB_OFFLINE.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, BatchFeature, Qwen2_5_VLForConditionalGeneration

from styledistill.io.weights import model_dir_revision, torch_dtype
from styledistill.vlm.base import ChatRequest, ChatResult, TransformersVLMOptions, VLMClient


class TransformersVLM(VLMClient):
    def __init__(self, options: TransformersVLMOptions, device: str = "cpu", threads: int = 1):
        self.options = options
        self.device = device
        self.threads = threads
        self.model: Qwen2_5_VLForConditionalGeneration | None = None
        self.processor = None
        self.revision: str | None = None

    def setup(self) -> None:
        # A cached hub id resolves to snapshots/<commit>: record which one answered.
        folder, self.revision = model_dir_revision(self.options.model_path, "VLM")
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        default = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        dtype = default if self.options.dtype == "auto" else torch_dtype(self.options.dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            )
        except (OSError, ValueError) as err:  # e.g. a folder without processor files or weights
            raise FileNotFoundError(f"VLM: cannot load a Qwen2.5-VL model from {folder}: {err}") from None
        self.model.to(self.device).eval()

    def prepare(self, request: ChatRequest) -> BatchFeature:
        """Processor inputs for one request: the images in order in one user turn, then the text."""
        content = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}]
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        kwargs = {}
        if self.options.max_pixels is not None:
            shortest = min(self.processor.image_processor.size["shortest_edge"], self.options.max_pixels)
            kwargs["size"] = {"shortest_edge": shortest, "longest_edge": self.options.max_pixels}
        images = [Image.fromarray(np.ascontiguousarray(image)) for image in request.images] or None
        return self.processor(text=[prompt], images=images, return_tensors="pt", **kwargs).to(self.device)

    @torch.inference_mode()
    def _generate(self, request: ChatRequest) -> str:
        inputs = self.prepare(request)
        output = self.model.generate(**inputs, max_new_tokens=request.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if self.model is None:
            raise RuntimeError("TransformersVLM.setup() was not called")
        results = []
        # One request at a time: requests differ in image count and size, and batching them would need
        # left padding that changes nothing about the answers.
        for request in requests:
            try:
                results.append(ChatResult(text=self._generate(request)))
            except Exception as err:  # noqa: BLE001 - one failing sample must not fail the batch
                results.append(ChatResult(error=f"{type(err).__name__}: {err}"))
        return results

    def model_info(self) -> dict[str, str]:
        return {
            "vlm_backend": "transformers",
            "vlm_model": self.options.model_path,
            "vlm_revision": self.revision or "local folder",
            "vlm_dtype": str(self.model.dtype) if self.model is not None else self.options.dtype,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
