// The login page: exchanges a bearer token for a session cookie (POST /api/login), then opens
// the dashboard. The token is not kept anywhere by the page.
"use strict";

async function logIn(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const box = document.getElementById("message");
  const response = await fetch("/api/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: input.value.trim() }),
  });
  input.value = "";
  if (response.ok) {
    window.location.assign("/");
    return;
  }
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error.message;
  } catch (_) {
    // keep the status text
  }
  box.textContent = `${response.status}: ${message}`;
  box.hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", logIn);
});
