"""Metergate admin app: Stripe subscriptions, webhooks, billing API."""
