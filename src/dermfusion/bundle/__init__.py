"""Bundles: the directory a trained model lives in (``store``), and where training runs keep them (``resolve``).

Everything that predicts loads a bundle; nothing depends on a training run's folder layout except
``resolve``, which turns a bundle, a run directory or a list of them into bundle directories.
"""
from .resolve import find_run_dir, resolve_one, resolve_run, run_bundles, write_average_bundle
from .store import (BUNDLE_FORMAT, SUMS_FILE, UNHASHED_FILES, Bundle, BundleError, BundleIntegrityError, Integrity,
                    file_sums, hash_dir, is_bundle, member_paths, read_bundle, seal_bundle, update_calibration,
                    update_file, update_files, upgrade_seal, verify_bundle, verify_tree, write_bundle)

__all__ = ["BUNDLE_FORMAT", "SUMS_FILE", "UNHASHED_FILES", "Bundle", "BundleError", "BundleIntegrityError", "Integrity",
           "file_sums", "find_run_dir", "hash_dir", "is_bundle", "member_paths", "read_bundle", "resolve_one",
           "resolve_run", "run_bundles", "seal_bundle", "update_calibration", "update_file", "update_files", "upgrade_seal",
           "verify_bundle", "verify_tree", "write_average_bundle", "write_bundle"]
