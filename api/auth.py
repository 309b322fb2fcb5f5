"""HTTP Basic authentication for the API (`--api-auth user:pass,...`), compared in constant time."""
from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials


def basic_auth_dependency(logins: list[tuple[str, str]]):
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if credentials is not None:
            for user, password in logins:
                user_ok = secrets.compare_digest(credentials.username.encode(), user.encode())
                pass_ok = secrets.compare_digest(credentials.password.encode(), password.encode())
                if user_ok and pass_ok:
                    return
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check
