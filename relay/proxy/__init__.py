"""The streaming relay: headers, admission, the response that owns a stream."""
