"""Known-harmless third-party warnings are dropped by logger and message; anything else from the
same libraries still reaches the log."""

import logging
import warnings


def test_known_noise_is_dropped_and_other_warnings_pass(tmp_path, caplog):
    from recsys_dist.train.report import KNOWN_NOISE, setup_logging

    setup_logging(0, tmp_path)
    for name, prefix in KNOWN_NOISE:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        logger.warning(prefix + " (test)")
    logging.getLogger("torchrec.distributed.planner.types").warning("a real planner problem")
    for h in logging.getLogger().handlers:
        h.flush()
    text = (tmp_path / "train.log").read_text()
    assert "a real planner problem" in text
    assert not any(prefix in text for _, prefix in KNOWN_NOISE), text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from recsys_dist.train.report import quiet_known_noise
        quiet_known_noise()
        warnings.warn("HeuristicalStorageReservation is known to cause issues", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]
