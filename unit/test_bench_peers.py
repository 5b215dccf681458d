"""The peers' building blocks (sensimix.bench.peers): length bucketing keeps the logits and cuts the padding."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForSequenceClassification

from sensimix.bench.peers import CudaGraphed, LengthBuckets


class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.widths = inner, []

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        self.widths.append(input_ids.shape[1])
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@pytest.mark.parametrize("buckets", [1, 4, 13])
def test_length_buckets_keep_the_logits_and_cut_the_padding(tiny_bert_config, buckets):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config).eval()
    n, width = 11, 24
    lengths = torch.tensor([24, 3, 7, 24, 12, 5, 18, 9, 2, 15, 6])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(5, tiny_bert_config.vocab_size, (n, width)).masked_fill(mask == 0, 0)
    types = (torch.arange(width)[None] >= (lengths[:, None] // 2)).long() * mask
    recorder = Recorder(model)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = LengthBuckets(recorder, buckets)(ids, mask, types)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(recorder.widths) == min(buckets, n) and recorder.widths == sorted(recorder.widths)
    assert recorder.widths[-1] == width and (buckets == 1 or recorder.widths[0] < width)


def test_length_buckets_cut_each_bucket_to_its_longest_sequence():
    # lengths 2, 9, 3, 5 in 2 buckets: sorted 2, 3 | 5, 9 -> widths 3 and 9 of the padded 12
    lengths = torch.tensor([2, 9, 3, 5])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    seen = []

    def inner(ids, attention_mask, types):
        seen.append((ids[:, 0].tolist(), ids.shape[1]))
        return ids[:, :1].float()  # each row's "logit": its own first token id

    ids = torch.arange(4)[:, None].expand(4, 12) * mask
    out = LengthBuckets(inner, 2)(ids, mask, torch.zeros_like(ids))
    assert seen == [([0, 2], 3), ([3, 1], 9)]
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]  # back in the batch's order


def test_length_buckets_refuse_zero_buckets():
    with pytest.raises(ValueError, match="^buckets must be >= 1, got 0$"):
        LengthBuckets(torch.nn.Identity(), 0)


def test_cuda_graphed_peer_twin_keeps_the_logits_and_one_buffer_set_per_shape(tiny_bert_config):
    # the eager twin of a transformers peer replayed from CUDA graphs (capture=False on the CPU): the same logits,
    # one entry per input shape, the second batch of a shape copied into the first one's buffers
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config).eval()
    graphed = CudaGraphed(model, capture=False)
    g = torch.Generator().manual_seed(1)
    for ids in (torch.randint(5, 100, (3, 10), generator=g), torch.randint(5, 100, (3, 10), generator=g),
                torch.randint(5, 100, (2, 7), generator=g)):
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=mask).logits
            got = graphed(ids, mask)
        assert torch.equal(got, want)
    assert {k[0]: e.calls for k, e in graphed.cache.entries.items()} == {(3, 10): 2, (2, 7): 1}
    assert graphed.config is model.config  # run_inference reads max_position_embeddings from it
