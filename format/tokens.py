"""SentencePiece piece types: the numbers GGUF stores in tokenizer.ggml.token_type (gguf.TokenType)."""
from gguf import TokenType

NORMAL = int(TokenType.NORMAL)              # 1
UNKNOWN = int(TokenType.UNKNOWN)            # 2
CONTROL = int(TokenType.CONTROL)            # 3
USER_DEFINED = int(TokenType.USER_DEFINED)  # 4
UNUSED = int(TokenType.UNUSED)              # 5
BYTE = int(TokenType.BYTE)                  # 6
TOKEN_TYPES = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
