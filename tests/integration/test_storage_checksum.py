"""Custom endpoints get request checksums "when required": no CRC trailers reach the store."""
import pytest

from dmdr.storage import StorageConfig, Syncer, make_client
from dmdr.storage.client import MiB
from helpers_s3 import TcpProxy, bucket, key_of, make_checkpoint, moto, s3_env  # noqa: F401

pytestmark = pytest.mark.slow
SIZES = {"accelerator_1/step-{s}/model.safetensors": 6 * MiB, "torch_units/step-{s}.pt": 10}


def _upload(moto, bucket, tmp_path, checksum_mode):
    proxy = TcpProxy(moto.port).up()
    exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=proxy.endpoint, part_size_mb=5, checksum_mode=checksum_mode)
    make_checkpoint(exp, 1, SIZES)
    with Syncer(exp, uri, cfg, sync_interval=0) as syncer:
        syncer.submit_checkpoint(1)
        assert syncer.wait_checkpoint(timeout=60)
    proxy.down()
    writes = [h for m, p, h in proxy.requests if m in ("PUT", "POST") and "/step-1" in key_of(p)]
    crc_headers = [k for h in writes for k in h if k.startswith("x-amz-checksum-") or k == "x-amz-trailer"]
    head = moto.client().head_object(Bucket=bucket, Key="p/exp/checkpoints/torch_units/step-1.pt",
                                     ChecksumMode="ENABLED")
    return make_client(cfg), crc_headers, "ChecksumCRC32" in head


def test_custom_endpoint_sends_no_checksum_trailers(moto, bucket, tmp_path):
    client, crc_headers, stored_crc = _upload(moto, bucket, tmp_path, checksum_mode=None)
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"
    assert crc_headers == [] and not stored_crc


def test_asking_for_checksums_turns_them_back_on(moto, bucket, tmp_path):
    client, crc_headers, stored_crc = _upload(moto, bucket, tmp_path, checksum_mode="when_supported")
    assert client.meta.config.request_checksum_calculation == "when_supported"
    assert crc_headers and stored_crc
