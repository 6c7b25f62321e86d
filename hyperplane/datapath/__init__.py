"""The data path seen from Python: compile, pin and attach it (bcc), read its pinned maps without compiling, its constants from the C, BPF_PROG_TEST_RUN."""
