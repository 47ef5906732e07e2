"""Google's OAuth as the emulator serves it: a service-account key, tokens, ID tokens.

The emulator generates a real RSA key for one service account and writes the
usual JSON key file (``token_uri`` = the emulator's token endpoint), so
google-auth's own service-account flows work against it unchanged:

- the JWT-bearer grant (``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``)
  with a ``scope`` claim returns an opaque ``access_token`` for API calls;
- the same grant with a ``target_audience`` claim returns an ``id_token``, a JWT
  signed by the emulator's own key with ``aud`` = that audience (a function URL);
- a self-signed JWT of the service account (what Google's client libraries send
  with ``always_use_jwt_access``) is accepted as an API bearer token too.

Signing and verifying use google-auth's ``crypt``/``jwt`` modules.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt, jwt

GOOGLE_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME = 3600
ISSUER = "https://accounts.google.com"


class AuthError(Exception):
    """A token request or bearer token the emulator rejects (``status``, OAuth ``error``)."""

    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


def _new_key() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


class TokenAuthority:
    """The emulator's service account, its token endpoint and the ID-token issuer."""

    def __init__(self, project: str, account: str = "dask-lithops-emulator"):
        self.project = project
        self.client_email = f"{account}@{project}.iam.gserviceaccount.com"
        self.client_id = str(int.from_bytes(secrets.token_bytes(8), "big"))
        self.key_id = secrets.token_hex(20)
        self._sa_private, self._sa_public = _new_key()
        # the key ID tokens are signed with (Google's, not the service account's)
        self._issuer_kid = secrets.token_hex(20)
        issuer_private, self._issuer_public = _new_key()
        self._issuer_signer = crypt.RSASigner.from_string(issuer_private, self._issuer_kid)
        self._access_tokens: dict[str, float] = {}
        self.token_uri = ""

    def service_account_info(self, token_uri: str) -> dict:
        """The JSON key file's content (a secret: write it with mode 0600)."""
        return {
            "type": "service_account", "project_id": self.project,
            "private_key_id": self.key_id, "private_key": self._sa_private,
            "client_email": self.client_email, "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                    + self.client_email.replace("@", "%40"),
            "universe_domain": "googleapis.com",
        }

    # ------------------------------------------------------------ token endpoint

    def grant(self, form: dict) -> dict:
        """Answer a token request (form fields already decoded)."""
        if form.get("grant_type") != JWT_BEARER_GRANT:
            raise AuthError(400, "unsupported_grant_type",
                            f"grant_type must be {JWT_BEARER_GRANT} "
                            f"(got {form.get('grant_type')!r})")
        assertion = form.get("assertion") or ""
        try:
            claims = jwt.decode(assertion, certs={self.key_id: self._sa_public},
                                audience=[GOOGLE_TOKEN_ENDPOINT, self.token_uri])
        except Exception as e:
            raise AuthError(400, "invalid_grant", f"Invalid JWT Signature or claims: {e}") from None
        if claims.get("iss") != self.client_email:
            raise AuthError(400, "invalid_grant", f"Invalid issuer {claims.get('iss')!r}: the "
                                                  f"emulator knows {self.client_email} only")
        if claims.get("target_audience"):
            return {"id_token": self.id_token(claims["target_audience"])}
        if not claims.get("scope"):
            raise AuthError(400, "invalid_scope",
                            "Invalid OAuth scope or ID token audience provided.")
        token = "ya29.emulator-" + secrets.token_urlsafe(32)
        self._access_tokens[token] = time.time() + TOKEN_LIFETIME
        return {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}

    def id_token(self, audience: str, lifetime: int = TOKEN_LIFETIME) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": audience, "azp": self.client_id,
                   "sub": self.client_id, "email": self.client_email, "email_verified": True,
                   "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex}
        return jwt.encode(self._issuer_signer, payload).decode()

    def jwks(self) -> dict:
        """The issuer's public key (what ``/oauth2/v3/certs`` serves), as PEM by key id."""
        return {self._issuer_kid: self._issuer_public}

    # ------------------------------------------------------------ verification

    def check_access(self, authorization: str | None) -> str:
        """Check an API call's ``Authorization``; return the caller's email."""
        token = _bearer(authorization)
        if token.count(".") == 2:  # a self-signed JWT of the service account
            try:
                claims = jwt.decode(token, certs={self.key_id: self._sa_public})
            except Exception as e:
                raise AuthError(401, "UNAUTHENTICATED", f"Invalid JWT: {e}") from None
            return claims.get("iss", "")
        expiry = self._access_tokens.get(token)
        if expiry is None or expiry < time.time():
            raise AuthError(401, "UNAUTHENTICATED",
                            "Request had invalid authentication credentials. Expected OAuth 2 "
                            "access token, login cookie or other valid authentication credential.")
        return self.client_email

    def check_id_token(self, authorization: str | None, audiences: list[str]) -> dict:
        """Check a function request's ID token; return its claims."""
        token = _bearer(authorization)
        try:
            return jwt.decode(token, certs=self.jwks(), audience=audiences)
        except Exception as e:
            raise AuthError(401, "UNAUTHENTICATED",
                            f"The request was not authenticated: invalid ID token ({e})") from None


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "UNAUTHENTICATED",
                        "Request is missing required authentication credential. Expected "
                        "OAuth 2 access token, login cookie or other valid authentication "
                        "credential.")
    return token.strip()


def write_key_file(path, info: dict) -> None:
    """Write a service-account key readable by its owner only."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
