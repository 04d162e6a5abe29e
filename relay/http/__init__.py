"""Sans-IO HTTP rules: ranges, validators, digests, when a body continues."""
