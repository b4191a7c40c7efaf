"""Makes a bearer token for a principal: `python -m broker.auth.tokens NAME` prints the token
(give it to the client, for example as TASKBROKER_TOKEN) and the policy entry holding only its
SHA-256."""

from __future__ import annotations

import secrets
import sys

from broker.auth.policy import PRINCIPAL_NAME, token_digest

#: Recognisable in a leaked-secret scan; 32 random bytes after it.
TOKEN_PREFIX = "tbk_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def policy_entry(name: str, token: str) -> str:
    return f'[[principals]]\nname = "{name}"\ntoken_sha256 = ["{token_digest(token)}"]\n'


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not PRINCIPAL_NAME.fullmatch(argv[0]):
        sys.stderr.write("usage: python -m broker.auth.tokens PRINCIPAL_NAME\n")
        return 2
    token = new_token()
    sys.stdout.write(f"token (give it to the client; it is shown only once): {token}\n\n")
    sys.stdout.write(f"policy file entry:\n\n{policy_entry(argv[0], token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
