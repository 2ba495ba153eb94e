"""The Grain pipelines with 2 mp_prefetch worker processes: resume, bad-record accounting."""
from absl import flags

from test_data_pipeline import check_resume, check_thirty_percent_bad, check_three_percent_bad

flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.


def test_resume_is_exact_with_workers_and_matches_in_process():
    check_resume(num_workers=2)


def test_three_percent_bad_files_counted_across_workers(tmp_path, caplog):
    check_three_percent_bad(tmp_path, caplog, num_workers=2)


def test_thirty_percent_bad_files_stop_from_a_worker(tmp_path):
    check_thirty_percent_bad(tmp_path, num_workers=2)
