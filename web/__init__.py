"""Transports only: WebRTC (aiortc) with the browser page, and websocket endpoints."""
