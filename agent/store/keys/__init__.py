"""Key custody: the master keys that wrap recordings' data keys (file or PKCS#11)
and the seal keyring that opens the masked digits of customers' numbers."""
