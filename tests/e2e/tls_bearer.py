"""boto3 with a Bedrock API key (AWS_BEARER_TOKEN_BEDROCK) against Mantle over HTTPS.

Usage: tls_bearer.py make-certs DIR            -- writes ca.pem, a.crt/a.key, b.crt/b.key (localhost)
       tls_bearer.py converse URL CA MODEL KEY  -- one Converse call with the API key
       tls_bearer.py served-cert HOST PORT      -- prints the PEM certificate the server presents
"""
import datetime
import ipaddress
import os
import ssl
import sys


def make_certs(out):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mantle test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(out, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    for name in ["a", "b"]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"localhost {name}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        with open(os.path.join(out, f"{name}.crt"), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(out, f"{name}.key"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))


def converse(url, ca, model, key):
    import boto3
    os.environ["AWS_BEARER_TOKEN_BEDROCK"] = key
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"]:
        os.environ.pop(name, None)
    client = boto3.client("bedrock-runtime", endpoint_url=url, region_name="us-east-1", verify=ca)
    reply = client.converse(modelId=model, messages=[{"role": "user", "content": [{"text": "hi"}]}],
                            inferenceConfig={"maxTokens": 8})
    print(reply["output"]["message"]["content"][0]["text"])


def served_cert(host, port):
    print(ssl.get_server_certificate((host, int(port))))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"make-certs": make_certs, "converse": converse, "served-cert": served_cert}[command](*args)
