"""Where recordings rest: blob stores (files, S3), the chunked AES-GCM format, the
vault that pairs a blob with its wrapped key, and the data-residency rules."""
